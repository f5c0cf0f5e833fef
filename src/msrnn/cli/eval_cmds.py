"""``msrnn eval ppl`` and ``msrnn generate``: written once against the StatefulLM protocol."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from msrnn.cli.common import add_output_flags, add_seed, int_list, positive_int, resolve_device


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (made by any msrnn command) or hub id")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    kv = p.add_argument_group("KV eviction (any HF decoder as a bounded multi-state RNN)")
    kv.add_argument("--policy", default=None, help="full | window | sink | h2o | tova (default: full cache)")
    kv.add_argument("--budget", type=positive_int, default=None, help="KV slots kept per layer")
    kv.add_argument("--sinks", type=int, default=None,
                    help="tokens always kept from the start: --policy sink (default 4) or tova (default 0)")
    kv.add_argument("--keep-newest", default=None, action="store_true",
                    help="tova variant: always keep the newest token (as kvpress does)")
    kv.add_argument("--recent", type=int, default=None, help="recent window for --policy h2o (default budget/2)")
    kv.add_argument("--per-head", default=None, action=argparse.BooleanOptionalAction,
                    help="select per KV head instead of per layer (h2o default: per head; tova: per layer)")
    kv.add_argument("--prefill", default="exact",
                    help="exact = same result as token by token for any chunk size; oneshot = evict once per chunk, "
                         "scored by its last query; chunked:C = evict once per C tokens, scored by those C queries")
    kv.add_argument("--positions", default="original", choices=["original", "rolling"],
                    help="original positions (TOVA) or positions inside the cache (StreamingLLM; RoPE models)")
    kv.add_argument("--storage", default="naive", choices=["naive", "fixed"],
                    help="naive = rebuild the kept slots every step; fixed = decode in place in a preallocated "
                         "budget + 1 slot buffer (the same tokens kept)")
    kv.add_argument("--compile", action="store_true",
                    help="torch.compile the in-place decode step (needs --storage fixed; the first steps compile)")


def check_compile_applies(args: argparse.Namespace, chunk_size: int, command: str, fix: str) -> None:
    """Refuse --compile where the command feeds no single-token decode step (the only step it compiles)."""
    from msrnn.errors import ConfigError

    if getattr(args, "compile", False) and chunk_size > 1:
        raise ConfigError(f"--compile captures single-token decode steps, and {command} feeds {chunk_size}-token "
                          f"chunks, so nothing would be compiled; {fix}")


def load_for_cli(args: argparse.Namespace, stream: bool = True):
    """Load --model as a StatefulLM, bounded by the KV policy flags when given. ``stream=False`` also accepts
    models without next-token logits (an encoder RMT classifier, for ``eval task``)."""
    from msrnn.errors import ConfigError
    from msrnn.models import load_lm

    lm = load_lm(args.model, device=resolve_device(args.device))
    if stream and not hasattr(lm, "forward_chunk"):
        raise ConfigError(f"{args.model} is a classifier without next-token logits (an encoder RMT); score it with "
                          "'msrnn eval task'")
    settings = kv_settings(args)
    if settings is None:
        return lm
    from msrnn.kv import apply_kv

    return apply_kv(lm, settings)


def kv_settings(args: argparse.Namespace):
    """The one place the KV flags become a :class:`~msrnn.kv.KVSettings` (None without --policy, refusing any KV
    flag given without one)."""
    from msrnn.kv import settings_or_none

    return settings_or_none(args.policy, "--policy", budget=args.budget, sinks=args.sinks, recent=args.recent,
                            per_head=args.per_head, keep_newest=args.keep_newest, prefill=args.prefill,
                            positions=args.positions, storage=args.storage, compile=args.compile)


def add_eval_ppl(ev: argparse._SubParsersAction) -> None:
    p = ev.add_parser("ppl", help="streaming perplexity over long documents",
                      description="Stream each document through the model chunk by chunk from a fresh state and "
                                  "report perplexity overall and by position, peak state bytes and tokens/s.")
    add_model_flags(p)
    p.add_argument("--data", default="stdlib:test", help="data spec; the default split is test (default stdlib:test)")
    p.add_argument("--documents", default="file", choices=["file", "folder"],
                   help="a document is one file or one folder concatenated (long code documents)")
    p.add_argument("--chunk-size", type=positive_int, default=128, help="tokens per forward; 1 = token by token")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens per document (truncate)")
    p.add_argument("--max-docs", type=positive_int, default=None)
    p.add_argument("--min-tokens", type=positive_int, default=2)
    p.add_argument("--add-bos", action="store_true", help="prepend BOS to each document")
    p.add_argument("--plot", default=None, help="write perplexity versus position to this PNG")
    p.add_argument("--at", default=None,
                   help="also report perplexity over the first n tokens for each n (e.g. 512,2048,8192), one pass")
    add_output_flags(p)
    p.set_defaults(func=run_eval_ppl)


def run_eval_ppl(args: argparse.Namespace) -> int:
    from msrnn.evaluate import StreamEvalConfig, evaluate_stream
    from msrnn.evaluate.documents import eval_documents
    from msrnn.evaluate.plots import log_buckets, plot_ppl_vs_position
    from msrnn.ui import out_console, print_json, table

    # Documents are selected by full length (--min-tokens) and truncated by eval_documents; the evaluator then
    # only needs its own minimum of 2 tokens.
    cfg = StreamEvalConfig(chunk_size=args.chunk_size, max_tokens=args.max_tokens, max_documents=args.max_docs)
    check_compile_applies(args, args.chunk_size, "eval ppl", "use --chunk-size 1 or drop --compile")
    from msrnn.errors import ConfigError

    at = int_list(args.at, "--at") if args.at else []  # checked before any work, not after it
    if at and max(at) > args.max_tokens:
        raise ConfigError(f"--at {max(at)} is past --max-tokens {args.max_tokens}; no document is scored that far")
    lm = load_for_cli(args)
    docs = eval_documents(args.data, getattr(lm, "tokenizer", None), unit=args.documents,
                          max_documents=args.max_docs, min_tokens=max(2, args.min_tokens), max_tokens=args.max_tokens,
                          add_bos=args.add_bos)
    res = evaluate_stream(lm, [d.ids for d in docs], cfg, progress=not (args.quiet or args.json))
    out = {"model": str(args.model), "data": args.data, "policy": getattr(getattr(lm, "policy", None), "describe",
                                                                         lambda: "full")(), **res.to_dict()}
    if args.at:
        out["ppl_at"] = {str(n): res.ppl_first(n) for n in at}
    if args.plot:
        plot_ppl_vs_position({str(args.model): log_buckets(res)}, args.plot, title=f"{args.model} on {args.data}")
        out["plot"] = args.plot
    if args.json:
        print_json(out)
        return 0
    out_console.print(table("perplexity by position", ["positions", "tokens", "ppl"],
                            [(f"{b['start']}-{b['end']}", b["tokens"], b["ppl"]) for b in res.buckets]))
    summary = [*((f"ppl (first {n})", v) for n, v in out.get("ppl_at", {}).items()),
               ("ppl", res.ppl), ("tokens", res.tokens), ("documents", res.documents),
               ("peak_state_bytes", res.peak_state_bytes), ("tokens_per_s", res.tokens_per_s)]
    out_console.print(table("summary", ["metric", "value"], summary + ([("plot", args.plot)] if args.plot else [])))
    return 0


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Continue --prompt with any msrnn model (greedy unless --temperature > 0).")
    add_model_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    add_seed(p)
    add_output_flags(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from msrnn.errors import ConfigError
    from msrnn.generate import generate
    from msrnn.ui import out_console, print_json

    lm = load_for_cli(args)
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"{args.model} has no tokenizer; save one into the model directory")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (kept as surrogates by Python)
        raise ConfigError("--prompt is not valid UTF-8 text; pass the prompt in UTF-8") from None
    ids = tok(args.prompt)["input_ids"]
    if not ids:
        raise ConfigError("the prompt is empty after tokenization; give a non-empty --prompt")
    new = generate(lm, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    text = tok.decode(new[0].tolist())
    if args.json:
        print_json({"prompt": args.prompt, "completion": text, "new_tokens": new.shape[1]})
    else:
        out_console.print(args.prompt, end="", style="bold", markup=False, highlight=False)
        out_console.print(text, markup=False, highlight=False)
    return 0


def add_eval_harness(ev: argparse._SubParsersAction) -> None:
    p = ev.add_parser("harness", help="lm-evaluation-harness tasks for any family (pip install 'msrnn[harness]')")
    add_model_flags(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None,
                   help="a folder of extra lm-eval task YAMLs (local tasks: no download needed)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (lm-eval's)")
    p.add_argument("--limit", type=positive_int, default=None, help="samples per task")
    p.add_argument("--chunk-size", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="log-likelihood requests scored together (right-padded; generation runs one at a time)")
    p.add_argument("--output-path", default=None, help="also write the results JSON to this file")
    add_output_flags(p)
    p.set_defaults(func=run_eval_harness)


def run_eval_harness(args: argparse.Namespace) -> int:
    from msrnn.errors import ConfigError
    from msrnn.ui import print_json

    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise ConfigError(f"--include-path {args.include_path} is not a folder of task YAMLs")
    settings = kv_settings(args)
    try:
        import lm_eval

        from msrnn.harness import MsrnnHarnessLM
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'msrnn[harness]'") from None
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path)
    unknown = sorted(set(tasks) - set(manager.match_tasks(tasks)))
    if not tasks or unknown:  # before loading the model, not as lm-eval's traceback after it
        named = ", ".join(unknown) or repr(args.tasks)
        raise ConfigError(f"--tasks names no task lm-eval knows ({named}); list them "
                          "with `lm-eval ls tasks`, or add --include-path for your own YAMLs")
    kv = {} if settings is None else asdict(settings)
    lm = MsrnnHarnessLM(args.model, chunk_size=args.chunk_size, device=resolve_device(args.device),
                        batch_size=args.batch_size, **kv)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                                  task_manager=manager)
    report = {"model": args.model, "tasks": args.tasks, "kv": kv or None, "num_fewshot": args.num_fewshot,
              "batch_size": args.batch_size,
              "results": res["results"]}  # lm-eval's nested metrics
    if args.output_path:
        from msrnn.io import write_json
        from msrnn.provenance import stamped

        write_json(args.output_path, stamped(report))
    print_json(report)
    return 0
