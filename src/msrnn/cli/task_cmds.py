"""``msrnn eval task``: memory-task accuracy and state bytes versus length, for any family."""

from __future__ import annotations

import argparse

from msrnn.cli.common import add_output_flags, int_list, positive_int, seed_int
from msrnn.errors import ConfigError


def add_eval_task(ev: argparse._SubParsersAction) -> None:
    from msrnn.cli.eval_cmds import add_model_flags

    p = ev.add_parser("task", help="memory-task accuracy versus input length (any family)",
                      description="Generate task samples of segments x segment-length tokens (a fixed seed, so "
                                  "every model sees the same inputs), stream them through the model and score the "
                                  "answer after the question. Reports accuracy and peak state bytes per length.")
    add_model_flags(p)
    p.add_argument("--task", default=None, help="memorize | detect | reasoning (default: the model's own task)")
    p.add_argument("--segments", default=None, help="lengths in segments (default 1,2,4,8,16,32; not with --babilong)")
    p.add_argument("--segment-length", type=positive_int, default=None,
                   help="tokens per segment (default: the RMT model's; required for other models)")
    p.add_argument("--samples", type=positive_int, default=100,
                   help="samples per length (default 100; with --babilong, the file's first N)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--noise", default="stdlib", help="noise text (default: stdlib docstrings, test split)")
    p.add_argument("--babilong", default=None, help="score a BABILong JSON file instead of generated samples")
    p.add_argument("--babilong-task", default=None, help="task key inside a multi-task BABILong file (e.g. qa1)")
    p.add_argument("--seed", type=seed_int, default=1234)
    p.add_argument("--plot", default=None, help="write accuracy versus segments to this PNG")
    add_output_flags(p)
    p.set_defaults(func=run_eval_task)


def run_eval_task(args: argparse.Namespace) -> int:
    from msrnn.bench.timing import own_peak_rss_mib
    from msrnn.cli.eval_cmds import check_compile_applies, load_for_cli
    from msrnn.evaluate.tasks import TaskEvalConfig, evaluate_task
    from msrnn.families import lm_family
    from msrnn.tasks import TASKS, TaskGenerator, babilong_samples, noise_sentences
    from msrnn.ui import out_console, print_json, table

    model = load_for_cli(args, stream=False)
    trained, trained_S = lm_family(model).trained_task(model)  # what the model's own config records, if anything
    task = args.task or trained
    if task is None:
        raise ConfigError("this model was not trained on a task; name one with --task "
                          f"({', '.join(TASKS.names())})")
    spec = TASKS.get(task)
    if trained and task != trained:
        raise ConfigError(f"{args.model} was trained on {trained!r}, not {task!r}; drop --task or "
                          "evaluate a model trained on it")
    S = args.segment_length or trained_S
    if S is None:
        raise ConfigError("--segment-length is required for a model without segments (it sets tokens per segment)")
    check_compile_applies(args, S, "eval task", "drop --compile")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer saved; save one next to the weights")
    gen = TaskGenerator(spec, tokenizer, noise_sentences(args.noise, "test"))
    cfg = TaskEvalConfig(samples=args.samples, batch_size=args.batch_size, chunk_size=S, seed=args.seed)
    if args.babilong and args.segments is not None:  # a BABILong file fixes its own lengths
        raise ConfigError("--segments sets the lengths of generated samples; a --babilong file brings its own, so "
                          "drop --segments")
    segments = int_list(args.segments or "1,2,4,8,16,32", "--segments")
    fixed = None
    if args.babilong:
        data, _ = babilong_samples(args.babilong, tokenizer, list(spec.labels), args.babilong_task)
        fixed = {0: data[: args.samples]}
        lengths = [0]
    else:
        if gen.min_length() > min(segments) * S:
            raise ConfigError(f"{min(segments)} segment(s) of {S} tokens cannot hold the {task!r} facts and "
                              f"question ({gen.min_length()} tokens); use longer segments")
        lengths = [n * S for n in segments]
    rows = []
    for n in lengths:  # one length at a time, so the RSS after each is that length's peak so far
        row = evaluate_task(model, gen, [n], cfg, samples=fixed, progress=not (args.quiet or args.json))[0]
        row["segments"] = n // S if n else None
        row["peak_rss_mib"] = round(own_peak_rss_mib(), 1)
        rows.append(row)
    if args.babilong:
        rows[0]["tokens"] = max(len(s.input_ids) for s in fixed[0])
    result = {"model": str(args.model), "task": task, "segment_length": S,
              "samples": len(fixed[0]) if fixed else args.samples,
              "results": [{"segments": r["segments"], "tokens": r["tokens"], "accuracy": r["accuracy"],
                           "peak_state_bytes": r["peak_state_bytes"], "samples": r["samples"],
                           "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]} for r in rows]}
    if args.plot:
        from msrnn.evaluate.plots import plot_accuracy_vs_segments

        plot_accuracy_vs_segments({str(args.model): result["results"]}, args.plot, title=f"{task}",
                                  chance=1 / len(spec.labels))
        result["plot"] = args.plot
    if args.json:
        print_json(result)
        return 0
    out_console.print(table(f"{task}: accuracy versus length ({S} tokens per segment)",
                            ["segments", "tokens", "accuracy", "peak state bytes", "s", "peak RSS MiB"],
                            [[r["segments"], r["tokens"], r["accuracy"], r["peak_state_bytes"], r["seconds"],
                              r["peak_rss_mib"]] for r in result["results"]]))
    return 0
