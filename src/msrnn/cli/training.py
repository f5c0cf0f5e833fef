"""Flags and plumbing shared by every training command (``pretrain``, ``train supra``, later BST and RMT)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from msrnn.cli.common import add_output_flags, add_seed, positive_int
from msrnn.data.batches import PACKINGS
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
    add_scale_flags(p)
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument("--repeat-fraction", type=float, default=0.25,
                   help="share of each batch whose 2nd half repeats the 1st (induction heads; default 0.25)")
    p.add_argument("--packing", choices=PACKINGS, default="documents",
                   help="documents (default): each document of a window starts from a fresh state (restarting "
                        "position ids, or a row each where the model does not take them); stream: windows run "
                        "across document boundaries, as before")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--save-every", type=int, default=save_every)
    add_run_folder_flags(p)
    add_seed(p)
    add_output_flags(p)


def add_scale_flags(p: argparse.ArgumentParser) -> None:
    """--precision: how weights, optimizer states and the forward are held (msrnn.train.config.PRECISIONS)."""
    from msrnn.train.config import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="fp32; bf16-mixed (fp32 master weights and optimizer states, bf16 forward); bf16 (all bf16: "
                        "small updates are lost); auto: bf16-mixed on a bf16 GPU, fp32 otherwise. The model is "
                        "exported in the dtype it was loaded in")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer in backward: less activation memory, a slower step")
    from msrnn.train.config import TRACKERS

    p.add_argument("--report-to", choices=TRACKERS, default="none",
                   help="also log every step to TensorBoard or Weights & Biases (through Accelerate; logs under "
                        "OUT/logs; needs that package)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer states over the processes (PyTorch FSDP2; launch "
                        "with torchrun or accelerate launch); checkpoints are torch distributed checkpoints, which "
                        "resume under another process count at the same global batch")


def add_run_folder_flags(p: argparse.ArgumentParser) -> None:
    """--resume / --overwrite: the only two ways to use an --out that already holds a run."""
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run (its checkpoints and model marker are removed)")


def run_in(out: Path) -> str | None:
    """What run ``out`` holds (a finished model, checkpoints), or None."""
    steps = sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/trainer_state.*")
                   if p.parent.name.split("-")[1].isdigit())
    held = []
    if (out / "msrnn.json").exists():
        held.append("a trained model")
    if steps:
        held.append(f"checkpoints up to step {steps[-1]}")
    return " and ".join(held) or None


def check_out(args: argparse.Namespace) -> Path:
    """The --out of a training command. A folder that holds a run (a finished model or checkpoints) is used only with
    --resume (continue it) or --overwrite (start over): a rerun without either would train from step 0, delete the
    new checkpoints' predecessors and leave a later --resume continuing the other run."""
    import shutil

    out = Path(args.out)
    overwrite = getattr(args, "overwrite", False)
    if args.resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    held = run_in(out)
    if held and not args.resume and not overwrite:
        raise ConfigError(f"{out} already holds a run ({held}); pass --resume to continue it, --overwrite to start "
                          "over, or choose another --out")
    if args.resume and not any((out / "checkpoints").glob("step-*/trainer_state.*")):
        raise ConfigError(f"nothing to resume in {out} (no checkpoint under {out / 'checkpoints'}); drop --resume")
    if held and overwrite:
        if (out / "checkpoints").is_symlink():
            (out / "checkpoints").unlink()
        else:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "msrnn.json").unlink(missing_ok=True)
    return out


def train_config(args: argparse.Namespace) -> Any:
    from msrnn.train import TrainConfig

    return TrainConfig(max_steps=args.max_steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                       warmup_steps=args.warmup_steps, grad_accum=args.grad_accum, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed, precision=args.precision,
                       activation_checkpointing=args.activation_checkpointing, fsdp=args.fsdp,
                       report_to=args.report_to)


def summary(out: Path, trainer: Any, result: Any) -> dict[str, Any]:
    val = next((h["val_loss"] for h in reversed(result.history) if "val_loss" in h), None)
    # final_loss: the exported weights' loss (after the last update); last_step_loss: the last logged step's, which
    # is computed before that step's update.
    final = trainer.post_update_loss if trainer.post_update_loss is not None else result.final_loss
    return {"out": str(out), "steps": trainer.step, "tokens": result.tokens, "seconds": result.seconds,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9), "final_loss": final,
            "last_step_loss": result.final_loss, "val_loss": val}
