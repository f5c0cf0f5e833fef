"""One trainer for every family, on Hugging Face Accelerate.

Multi-process runs are DDP: ``torchrun --nproc_per_node N`` (gloo on CPU, tested against a single-process step in
``tests/test_ddp.py``) or ``accelerate launch --multi_gpu`` on GPUs; ``accelerate launch --cpu --num_processes N``
starts one process and is refused (:func:`check_launch`). FSDP is not supported: checkpoints save the unwrapped
model and the optimizer from rank 0, which is only right when every rank holds the whole model.

The trainer knows nothing about the model family: it takes a model, a batch function
``batch_fn(step, micro_step, rank) -> dict`` that is deterministic in its arguments, and a loss function.

Checkpoints hold the model (``save_pretrained``, safetensors), optimizer, scheduler, RNG states and the log;
they are written to a temp dir and renamed, so an interrupted save never leaves a half checkpoint. Resuming
restores all of it and, because batches are a function of the step, continues the same loss curve. The state file
holds only tensors and plain values and is loaded with ``weights_only=True``: a crafted one is refused, not run.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msrnn.errors import ConfigError, ModelLoadError, NumericsError
from msrnn.io import atomic_dir, write_json
from msrnn.train.config import TrainConfig
from msrnn.ui import err_console

log = logging.getLogger(__name__)

BatchFn = Callable[[int, int, int], dict[str, torch.Tensor]]
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
ValFn = Callable[[torch.nn.Module], dict[str, float]]

STATE_FILE = "trainer_state.pt"


def check_launch(num_processes: int, env: Any = None) -> None:
    """Refuse a launch that asked for several processes but got one: ``accelerate launch --cpu --num_processes N``
    starts a single process (accelerate's simple launcher only exports MASTER_ADDR for N > 1), which would train
    1/N of the tokens per step while looking like a distributed run."""
    import os

    env = os.environ if env is None else env
    asked = "MASTER_ADDR" in env and "WORLD_SIZE" not in env and "RANK" not in env
    if num_processes == 1 and asked and str(env.get("ACCELERATE_USE_CPU", "")).lower() == "true":
        raise ConfigError("accelerate launch --cpu --num_processes N runs one process, not N; for N CPU processes "
                          "use `torchrun --nproc_per_node N -m msrnn.cli.main ...` (gloo DDP), for N GPUs "
                          "`accelerate launch --multi_gpu --num_processes N ...`")


def default_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Causal LM loss of a HF model (it shifts labels itself)."""
    return model(**batch)["loss"]  # ModelOutput or a plain dict (MemoryWrapper)


@dataclass
class TrainResult:
    """What a training run returns: the final step, the per-step log, tokens seen and seconds."""
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """The last logged training loss (NaN if none was logged)."""
        losses = [h["loss"] for h in self.history if "loss" in h]
        return losses[-1] if losses else float("nan")


def _param_groups(model: torch.nn.Module, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases and embeddings (1-D tensors and tied tables), the usual GPT recipe;
    and whatever a module asks for through ``optim_overrides() -> [(param, {"weight_decay", "max_lr"})]``, which is
    how the S4D kernel gets the S4 recipe (no decay, lr <= 1e-3) without the trainer knowing any family."""
    overrides: dict[int, dict[str, float]] = {}
    for module in model.modules():
        if callable(getattr(module, "optim_overrides", None)):
            overrides.update({id(p): o for p, o in module.optim_overrides()})
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in overrides:
            o = overrides[id(p)]
            key = (float(o.get("weight_decay", weight_decay)), min(lr, float(o.get("max_lr", lr))))
        else:
            key = (weight_decay if p.dim() >= 2 and "embed" not in name else 0.0, lr)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": group_lr} for (wd, group_lr), ps in sorted(groups.items())]


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so the checkpoint loads with ``weights_only=True``.

    ``np.random.get_state()`` holds an ndarray, which the safe unpickler refuses: its key is stored as a tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),  # (version, tuple of ints, gauss or None)
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


class Trainer:
    """Train any model with Accelerate: checkpoints, exact resume, validation, a curriculum (see module doc)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        batch_fn: BatchFn,
        out_dir: str | Path,
        loss_fn: LossFn = default_loss,
        val_fn: ValFn | None = None,
        tokens_per_step: int = 0,
        save_extra: Callable[[Path], None] | None = None,
        progress: bool = True,
        accelerator: Any = None,
        curriculum: Any = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.batch_fn = batch_fn
        self.loss_fn = loss_fn
        self.val_fn = val_fn
        self.out_dir = Path(out_dir)
        self.tokens_per_step = tokens_per_step
        self.save_extra = save_extra
        self.progress = progress
        # Anything with update(step, record) -> dict, state_dict() and load_state_dict(): told every validation
        # result and saved in every checkpoint (the segment curriculum of RMT training).
        self.curriculum = curriculum
        mp = config.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = accelerator or Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
        check_launch(self.accelerator.num_processes)
        torch.manual_seed(config.seed)
        optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay, config.lr), lr=config.lr, betas=(config.beta1, config.beta2),
            eps=config.adam_eps, fused=torch.cuda.is_available() or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.step = 0
        self.history: list[dict[str, float]] = []

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        """Where resumable checkpoints go: ``<out>/checkpoints/step-NNNNNNN``."""
        return self.out_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        if not self.checkpoint_root.exists():
            return None
        ckpts = sorted(
            (p for p in self.checkpoint_root.glob("step-*") if (p / STATE_FILE).exists()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint at the current step (main process only)."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        path = self.checkpoint_root / f"step-{self.step:07d}"
        with atomic_dir(path, overwrite=True) as tmp:
            self.accelerator.unwrap_model(self.model).save_pretrained(str(tmp), safe_serialization=True)
            torch.save(
                {
                    "step": self.step,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "history": self.history,
                    "config": self.config.to_dict(),
                    "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
                    "rng": _rng_state(),
                },
                tmp / STATE_FILE,
            )
        old = sorted(self.checkpoint_root.glob("step-*"))[: -self.config.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the newest (or given) checkpoint; returns False if there is none."""
        path = Path(path) if path else self.latest_checkpoint()
        if path is None:
            return False
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files or not (path / STATE_FILE).exists():
            raise ModelLoadError(f"checkpoint {path} is incomplete; delete it to resume from an earlier one")
        try:
            weights: dict[str, torch.Tensor] = {}
            for f in files:
                weights.update(load_file(str(f)))
            # weights_only: the restricted unpickler builds tensors and plain containers only, so a crafted
            # trainer_state.pt cannot run code (the state holds nothing else; see _rng_state).
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ModelLoadError(f"checkpoint {path} holds objects other than tensors and plain values (written by "
                                 "an older msrnn, or crafted); refusing to unpickle it. Delete it or retrain") from None
        except Exception as exc:
            raise ModelLoadError(f"checkpoint {path} is corrupt ({type(exc).__name__}); delete it and resume"
                                 ) from None
        self._check_same_recipe(path, state.get("config") or {})
        model = self.accelerator.unwrap_model(self.model)
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError:  # a tensor of another shape: the checkpoint was trained with another size
            raise ModelLoadError(f"checkpoint {path} holds weights of another model size; resume with the same "
                                 "--preset (and vocabulary) it was trained with") from None
        # Tied weights are saved once; anything else missing means the checkpoint does not fit this model.
        tied = getattr(model, "_tied_weights_keys", None) or {}
        missing = [k for k in missing if k not in tied and "lm_head" not in k]
        if missing or unexpected:
            raise ModelLoadError(f"checkpoint {path} does not match the model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); resume with the same --preset")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError):  # parameter groups differ: an older msrnn grouped the SSM differently
            raise ModelLoadError(f"checkpoint {path}'s optimizer state does not fit this model's parameter groups "
                                 "(written by an older msrnn?); start a new --out") from None
        self.step = int(state["step"])
        self.history = list(state["history"])
        if self.curriculum is not None and state.get("curriculum"):
            self.curriculum.load_state_dict(state["curriculum"])
        _set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # Changing these mid-run would not take effect (the optimizer's saved lr wins over --lr) or would silently
    # make the resumed curve a different run; the length of the run (max_steps) and logging cadence may change.
    RECIPE_FIELDS = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "beta1", "beta2", "adam_eps",
                     "grad_clip", "grad_accum", "seed", "mixed_precision")

    def _check_same_recipe(self, path: Path, saved: dict[str, Any]) -> None:
        now = self.config.to_dict()
        changed = [f"{k} {saved[k]} -> {now[k]}" for k in self.RECIPE_FIELDS if k in saved and saved[k] != now[k]]
        if changed:
            raise ConfigError(f"checkpoint {path} was trained with other settings ({'; '.join(changed)}); resume with "
                              "the flags it was trained with, or start a new --out")

    # ---------------------------------------------------------------- loop
    def _train_step(self) -> float:
        cfg, acc = self.config, self.accelerator
        self.model.train()
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(acc.device) for k, v in self.batch_fn(self.step, micro, acc.process_index).items()}
            last = micro == cfg.grad_accum - 1
            with (nullcontext() if last else acc.no_sync(self.model)), acc.autocast():
                loss = self.loss_fn(self.model, batch) / cfg.grad_accum
                acc.backward(loss)
            total += float(loss.detach())
        if acc.num_processes > 1:
            # The mean over ranks: what is logged is the step's loss, and every rank sees the same value, so a
            # non-finite loss on one rank stops all of them together instead of leaving the others in a collective.
            total = float(acc.reduce(torch.tensor(total, device=acc.device), reduction="mean"))
        if not math.isfinite(total):
            # Stop before the optimizer spreads NaN into the weights: the last checkpoint stays the good model.
            raise NumericsError(f"the training loss is {total} at step {self.step + 1}; the run diverged, so nothing "
                                "was exported. Lower --lr (or raise --warmup-steps) and train again")
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def _validate(self) -> dict[str, float]:
        if self.val_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            return self.val_fn(self.accelerator.unwrap_model(self.model))

    def train(self, until: int | None = None) -> TrainResult:
        """Train to ``config.max_steps`` (or stop early at step ``until``, as an interruption would)."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        cfg, acc = self.config, self.accelerator
        tokens_per_step = self.tokens_per_step * cfg.grad_accum * acc.num_processes
        stop = cfg.max_steps if until is None else min(until, cfg.max_steps)
        start_step, t0 = self.step, time.perf_counter()
        show = self.progress and acc.is_main_process
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not show, transient=False, console=err_console) as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=self.step, info="")
            while self.step < stop:
                loss = self._train_step()
                record: dict[str, float] = {"step": self.step, "loss": loss, "lr": max(self.scheduler.get_last_lr())}
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    record.update(self._validate())
                    if self.curriculum is not None:
                        record.update(self.curriculum.update(self.step, record))
                self.history.append(record)
                elapsed = time.perf_counter() - t0
                tps = (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)
                # Variable-length training (the RMT curriculum) passes no token count: show steps/s instead.
                rate = f"{tps:,.0f} tok/s" if tokens_per_step else f"{(self.step - start_step) / elapsed:.2f} step/s"
                info = f"loss {loss:.3f}  {rate}"
                if "val_loss" in record:
                    info += f"  val {record['val_loss']:.3f}"
                if "val_acc" in record:
                    info += f"  acc {record['val_acc']:.2f}"
                if self.curriculum is not None:
                    info += f"  seg {self.curriculum.stage}"
                bar.update(task, completed=self.step, info=info)
                if show and not err_console.is_terminal and self.step % max(1, cfg.max_steps // 20) == 0:
                    # Logs and CI have no live bar: a plain line every 5% instead.
                    err_console.print(f"train step {self.step}/{cfg.max_steps}  {info}")
                if cfg.log_every and self.step % cfg.log_every == 0:
                    log.info("step %d %s", self.step, info)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
        seconds = time.perf_counter() - t0
        self.save_checkpoint()
        if acc.is_main_process:
            write_json(self.out_dir / "history.json", self.history)
        return TrainResult(step=self.step, history=self.history,
                           tokens=(self.step - start_step) * tokens_per_step, seconds=seconds)

    def export(self, out_dir: str | Path | None = None, meta: dict[str, Any] | None = None) -> Path:
        """Write the trained model (+ whatever ``save_extra`` adds, e.g. the tokenizer) as a model directory.

        Files are written to a temp dir and moved into place one by one; ``msrnn.json`` is written last and
        marks the directory complete.
        """
        out = Path(out_dir) if out_dir else self.out_dir
        if not self.accelerator.is_main_process:
            return out
        out.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out / ".export") as tmp:
            self.accelerator.unwrap_model(self.model).save_pretrained(str(tmp), safe_serialization=True)
            if self.save_extra:
                self.save_extra(tmp)
        staged = out / ".export"
        for f in sorted(staged.iterdir()):
            f.replace(out / f.name)
        staged.rmdir()
        write_json(out / "msrnn.json", {"step": self.step, **(meta or {})})
        (out / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        return out
