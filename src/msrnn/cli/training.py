"""Flags and plumbing shared by every training command (``pretrain``, ``train supra``, later BST and RMT)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from msrnn.cli.common import add_output_flags, add_seed, positive_int
from msrnn.errors import ConfigError


def add_training_flags(p: argparse.ArgumentParser, *, max_steps: int, lr: float, warmup_steps: int,
                       eval_every: int, save_every: int) -> None:
    """--data/--out and the optimisation flags; defaults differ between pretraining and uptraining."""
    p.add_argument("--data", default="stdlib", help="corpus spec (train/val splits are taken from it)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--max-steps", type=positive_int, default=max_steps)
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument("--repeat-fraction", type=float, default=0.25,
                   help="share of each batch whose 2nd half repeats the 1st (induction heads; default 0.25)")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--save-every", type=int, default=save_every)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_seed(p)
    add_output_flags(p)


def check_out(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if (out / "msrnn.json").exists() and not args.resume:
        raise ConfigError(f"{out} already holds a trained model; pass --resume to continue it or choose another --out")
    if args.resume and not any((out / "checkpoints").glob("step-*/trainer_state.*")):
        raise ConfigError(f"nothing to resume in {out} (no checkpoint under {out / 'checkpoints'}); drop --resume")
    return out


def train_config(args: argparse.Namespace) -> Any:
    from msrnn.train import TrainConfig

    return TrainConfig(max_steps=args.max_steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                       warmup_steps=args.warmup_steps, grad_accum=args.grad_accum, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed)


def summary(out: Path, trainer: Any, result: Any) -> dict[str, Any]:
    val = next((h["val_loss"] for h in reversed(result.history) if "val_loss" in h), None)
    return {"out": str(out), "steps": trainer.step, "tokens": result.tokens, "seconds": result.seconds,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9), "final_loss": result.final_loss,
            "val_loss": val}
