"""``msrnn eval longctx`` (needle / passkey / RULER-style probes for any family) and ``msrnn ask`` (one context
read once, several questions answered from it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from msrnn.cli.common import add_output_flags, int_list, positive_int, seed_int
from msrnn.errors import ConfigError

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def _depths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--depths takes comma-separated fractions in [0, 1], e.g. 0,0.25,0.5,0.75,1; got {text!r}"
                          ) from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"--depths takes fractions in [0, 1] (0 = the haystack's start), got {text!r}")
    return values


def add_eval_longctx(ev: argparse._SubParsersAction) -> None:
    from msrnn.cli.eval_cmds import add_model_flags
    from msrnn.tasks.longctx import LONGCTX_TASKS

    p = ev.add_parser("longctx", help="needle / passkey / RULER-style probes versus length and depth (any family)",
                      description="Generate seeded long-context probes in the model's own tokens (the haystack is "
                                  "prose from --data), stream each prompt through the model and score the answer: "
                                  "greedy exact match, and the rank of the true answer among candidates by "
                                  "log-likelihood (with its chance level). KV policies also report needle retention. "
                                  "Tasks: " + ", ".join(f"{n} ({LONGCTX_TASKS.describe(n)})"
                                                        for n in LONGCTX_TASKS.names()))
    add_model_flags(p)
    p.add_argument("--tasks", default="passkey,niah_single", help="comma-separated task names (default "
                   "passkey,niah_single)")
    p.add_argument("--lengths", default="256,512,1024", help="prompt lengths in tokens (default 256,512,1024)")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths as fractions (default 0,.25,.5,.75,1)")
    p.add_argument("--samples", type=positive_int, default=5, help="samples per (length, depth) (default 5)")
    p.add_argument("--data", default="stdlib", help="the haystack's text (default stdlib docstrings, test split)")
    p.add_argument("--chunk-size", type=positive_int, default=512, help="tokens per forward while reading")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="greedy answer length (default: the longest candidate + 4 tokens)")
    p.add_argument("--seed", type=seed_int, default=1234)
    p.add_argument("--out", default=None, help="folder for results.json, a heatmap PNG per task and the length plot")
    p.add_argument("--lm-eval-dir", default=None,
                   help="instead of scoring, write the same samples as lm-eval task folders (YAML + JSONL, tag "
                        "msrnn_longctx) here, for python -m msrnn.harness run --include_path DIR")
    add_output_flags(p)
    p.set_defaults(func=run_eval_longctx)


def run_eval_longctx(args: argparse.Namespace) -> int:
    from msrnn.cli.common import save_results
    from msrnn.cli.eval_cmds import load_for_cli
    from msrnn.evaluate.longctx import LongCtxConfig, evaluate_longctx
    from msrnn.tasks.longctx import LONGCTX_TASKS, LongCtxGenerator
    from msrnn.tasks.noise import noise_sentences
    from msrnn.ui import out_console, print_json, table

    tasks = [t for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        LONGCTX_TASKS.get(t)  # unknown names refused before the model loads
    lengths, depths = int_list(args.lengths, "--lengths"), _depths(args.depths)
    if args.depths != DEFAULT_DEPTHS and not any(LONGCTX_TASKS.get(t).uses_depth for t in tasks):
        raise ConfigError(f"--depths places needles, and {', '.join(tasks)} have none (the list fills the context); "
                          "drop --depths")
    cfg = LongCtxConfig(samples=args.samples, chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens,
                        seed=args.seed)
    lm = load_for_cli(args)
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer saved; save one next to the weights")
    haystack = noise_sentences(args.data, "test")
    if args.lm_eval_dir:
        from msrnn.evaluate.longctx import write_lm_eval_tasks

        names = write_lm_eval_tasks(args.lm_eval_dir, [LongCtxGenerator(t, tokenizer, haystack) for t in tasks],
                                    lengths, depths, args.samples, args.seed)
        result = {"lm_eval_dir": str(args.lm_eval_dir), "tasks": names, "tag": "msrnn_longctx",
                  "command": f"python -m msrnn.harness run --model msrnn --model_args pretrained={args.model} "
                             f"--tasks msrnn_longctx --include_path {args.lm_eval_dir}"}
        if args.json:
            print_json(result)
        else:
            out_console.print(f"wrote {len(names)} lm-eval tasks to {args.lm_eval_dir}; run: {result['command']}")
        return 0
    rows = []
    for t in tasks:
        rows += evaluate_longctx(lm, LongCtxGenerator(t, tokenizer, haystack), lengths, depths, cfg,
                                 progress=not (args.quiet or args.json))
    result = {"model": str(args.model), "policy": args.policy, "budget": args.budget, "tasks": tasks,
              "samples": args.samples, "data": args.data, "rows": rows}
    if args.out:
        from msrnn.evaluate.plots import plot_longctx_vs_length, plot_needle_heatmap

        out = Path(args.out)
        result["plots"] = [str(plot_needle_heatmap([r for r in rows if r["task"] == t], out / f"heatmap_{t}.png",
                                                   title=f"{t}: {Path(str(args.model)).name}"
                                                   + (f", {args.policy}@{args.budget}" if args.policy else ""))
                           ) for t in tasks]
        result["plots"].append(str(plot_longctx_vs_length(rows, out / "accuracy_vs_length.png")))
        save_results(args.out, "results.json", result)
    if args.json:
        print_json(result)
        return 0
    body = [[r["task"], r["length"], "-" if r["depth"] is None else f"{100 * r['depth']:.0f}%",
             f"{100 * r['exact']:.0f}%", f"{100 * r['recall']:.0f}%",
             f"{100 * r['rank_acc']:.0f}% ({100 * r['chance']:.0f}%)",
             "-" if r["retention"] is None else f"{100 * r['retention']:.0f}%", r["peak_state_bytes"]] for r in rows]
    out_console.print(table(f"long-context probes, {args.samples} samples per cell", [
        "task", "length", "depth", "exact", "recall", "rank acc (chance)", "needle kept",
        "peak state bytes (prompt)"], body))
    return 0


def add_ask(sub: argparse._SubParsersAction) -> None:
    from msrnn.cli.eval_cmds import add_model_flags

    p = sub.add_parser("ask", help="read a context once and answer several questions from it (any family)",
                       description="Stream --context into the model's state once, then answer each --question "
                                   "greedily from its own copy of that state: the same answers as reading context + "
                                   "question from scratch, with the context read only once.")
    add_model_flags(p)
    p.add_argument("--context", required=True, help="a text file to read")
    p.add_argument("--question", action="append", required=True, help="a question (repeat for several)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--chunk-size", type=positive_int, default=512, help="tokens per forward while reading")
    add_output_flags(p)
    p.set_defaults(func=run_ask)


def run_ask(args: argparse.Namespace) -> int:
    import time

    import torch

    from msrnn.cli.eval_cmds import load_for_cli
    from msrnn.generate import answer_questions
    from msrnn.ui import out_console, print_json, table

    path = Path(args.context)
    if not path.is_file():
        raise ConfigError(f"--context {path} is not a file; give a text file to read")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"--context {path} is not UTF-8 text") from None
    if not text.strip():
        raise ConfigError(f"--context {path} is empty")
    lm = load_for_cli(args)
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"{args.model} has no tokenizer saved; save one next to the weights")

    def ids(s: str) -> torch.Tensor:
        return torch.tensor([tok(s, add_special_tokens=False)["input_ids"]])

    context = ids(text)
    questions = [ids((" " if not q.startswith((" ", "\n")) else "") + q) for q in args.question]
    if any(q.shape[1] == 0 for q in questions):
        raise ConfigError("a --question is empty")
    t0 = time.perf_counter()
    answers = answer_questions(lm, context, questions, args.max_new_tokens, prefill_chunk=args.chunk_size,
                               eos_token_id=getattr(tok, "eos_token_id", None))
    result = {"model": str(args.model), "context": str(path), "context_tokens": int(context.shape[1]),
              "seconds": time.perf_counter() - t0,
              "answers": [{"question": q, "answer": tok.decode(a[0].tolist())}
                          for q, a in zip(args.question, answers, strict=True)]}
    if args.json:
        print_json(result)
        return 0
    out_console.print(table(f"{path.name}: {result['context_tokens']:,} tokens read once",
                            ["question", "answer"], [[a["question"], a["answer"]] for a in result["answers"]]))
    return 0
