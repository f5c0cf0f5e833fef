"""One trainer for every family, on Hugging Face Accelerate.

Multi-process runs are DDP: ``torchrun --nproc_per_node N`` (gloo on CPU, tested against a single-process step and
for exact resume in ``tests/test_ddp.py``) or ``accelerate launch --multi_gpu`` on GPUs; ``accelerate launch --cpu
--num_processes N`` starts one process and is refused (:func:`check_launch`).

The trainer knows nothing about the model family: it takes a model, a batch function
``batch_fn(step, micro_step, rank) -> dict`` that is deterministic in its arguments, and a loss function.

Checkpoints go through Accelerate's own state saving (``Accelerator.save_state``, called on every rank): the
model as safetensors, the optimizer, and every rank's RNG states; next to them ``trainer_state.json`` holds the
step, log, recipe, scheduler and curriculum as plain JSON and marks the checkpoint complete. They are written to a
temp dir and renamed, so an interrupted save never leaves a half checkpoint. Resuming (``Accelerator.load_state``)
restores all of it on every rank and, because batches are a function of the step, continues the same loss curve.
Nothing is unpickled beyond tensors and plain values: Accelerate loads its files with ``weights_only=True``, and a
crafted one is refused, not run. The model is gathered with ``Accelerator.get_state_dict`` for export.

``TrainConfig.fsdp`` (``--fsdp``) shards the model with PyTorch FSDP2 instead of DDP (:mod:`msrnn.train.sharding`:
units, DCP checkpoints read without running pickled code, resume under another process count at the same global
batch, a consolidated export); tested on CPU with 2 gloo processes for every family in ``tests/test_fsdp.py``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msrnn.errors import ConfigError, ModelLoadError, NumericsError
from msrnn.io import atomic_dir, write_json
from msrnn.train.config import TrainConfig
from msrnn.ui import err_console

log = logging.getLogger(__name__)

BatchFn = Callable[[int, int, int], dict[str, torch.Tensor]]
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
ValFn = Callable[[torch.nn.Module], dict[str, float]]

STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete
_OLD_STATE_FILE = "trainer_state.pt"  # msrnn before Accelerate state saving


def check_launch(num_processes: int, env: Any = None) -> None:
    """Refuse a launch that asked for several processes but got one: ``accelerate launch --cpu --num_processes N``
    starts a single process (accelerate's simple launcher only exports MASTER_ADDR for N > 1), which would train
    1/N of the tokens per step while looking like a distributed run."""
    import os

    env = os.environ if env is None else env
    world = str(env.get("WORLD_SIZE", "1"))
    if num_processes == 1 and world.isdigit() and int(world) > 1:
        # Each of the launcher's processes would train alone, on its own copy, and write the same files.
        raise ConfigError(f"the launcher started {world} processes but training sees one; launch CPU training with "
                          "`torchrun --nproc_per_node N -m msrnn.cli.main ...` and nothing else that sets up "
                          "Accelerate first")
    asked = "MASTER_ADDR" in env and "WORLD_SIZE" not in env and "RANK" not in env
    if num_processes == 1 and asked and str(env.get("ACCELERATE_USE_CPU", "")).lower() == "true":
        raise ConfigError("accelerate launch --cpu --num_processes N runs one process, not N; for N CPU processes "
                          "use `torchrun --nproc_per_node N -m msrnn.cli.main ...` (gloo DDP), for N GPUs "
                          "`accelerate launch --multi_gpu --num_processes N ...`")


def process_state() -> Any:
    """Accelerate's process state as the trainer's Accelerator makes it (CPU processes on a machine without CUDA):
    a caller that needs the rank before the trainer exists must make it the same way, or a CPU launch under
    torchrun would be taken for one process per rank."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def default_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Causal LM loss of a HF model (it shifts labels itself), on full logits: the readable twin of the trainer's
    default, :class:`msrnn.train.loss.ChunkedLMLoss`."""
    from msrnn.train.loss import training_forward

    return training_forward(model, batch)["loss"]  # ModelOutput or a plain dict (MemoryWrapper)


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


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hide ``logger``'s warnings inside the block."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


class Trainer:
    """Train any model with Accelerate: checkpoints, exact resume, validation, a curriculum (see module doc)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        batch_fn: BatchFn,
        out_dir: str | Path,
        loss_fn: LossFn | None = None,
        val_fn: ValFn | None = None,
        tokens_per_step: int = 0,
        save_extra: Callable[[Path], None] | None = None,
        progress: bool = True,
        accelerator: Any = None,
        curriculum: Any = None,
        run: dict[str, Any] | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.batch_fn = batch_fn
        if loss_fn is None:  # the causal LM loss without the full [T, vocab] logits
            from msrnn.train.loss import ChunkedLMLoss

            loss_fn = ChunkedLMLoss()
        self.loss_fn = loss_fn
        self.val_fn = val_fn
        self.out_dir = Path(out_dir)
        self.tokens_per_step = tokens_per_step
        self.save_extra = save_extra
        self.progress = progress
        # Anything with update(step, record) -> dict, state_dict() and load_state_dict(): told every validation
        # result and saved in every checkpoint (the segment curriculum of RMT training).
        self.curriculum = curriculum
        # What defines the run besides the optimisation recipe (data, sequence length, batch size, task, model
        # knobs): saved in every checkpoint and compared on resume, so a resume with other settings is refused
        # instead of being recorded as the same run. JSON-normalised (tuples become lists) once, here.
        self.run = json.loads(json.dumps(run, default=str)) if run is not None else None
        self.precision = resolve_precision(config.precision)
        self.export_dtype = _loaded_dtype(model)
        cast_for_training(model, self.precision)
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        mp = "bf16" if self.precision == "bf16-mixed" else "no"
        if accelerator is not None and accelerator.mixed_precision != mp:  # it would autocast as it was built
            raise ConfigError(f"the Accelerator passed in runs mixed precision {accelerator.mixed_precision!r} but "
                              f"precision {config.precision!r} needs {mp!r}; build it with mixed_precision={mp!r} "
                              "or pass none")
        self.accelerator = accelerator or Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(),
                                                      **_tracking(config.report_to, self.out_dir))
        check_launch(self.accelerator.num_processes)
        if self.accelerator.log_with:  # every step's record goes to the trackers too (rank 0 writes)
            self.accelerator.init_trackers(self.out_dir.name or "msrnn",
                                           config=_flat_config({**config.to_dict(), **(self.run or {})}))
        torch.manual_seed(config.seed)
        if config.fsdp:  # sharded in place before the optimizer exists, so AdamW's states are sharded too
            from msrnn.train import sharding

            sharding.shard(model, self.accelerator)
        optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay, config.lr), lr=config.lr, betas=(config.beta1, config.beta2),
            eps=config.adam_eps, fused=torch.cuda.is_available() or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
        if config.fsdp:  # prepare() would wrap the sharded model in DDP as well
            self.model, self.optimizer = model, optimizer
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.resharded: list[dict[str, int]] = []  # FSDP resumes under another number of processes: step, from, to
        self.post_update_loss: float | None = None  # the final weights' loss, measured before export
        # Each weight tensor's largest entry when this run started (checked again before export).
        self._start_scale = self._max_abs()

    def _max_abs(self) -> dict[str, float]:
        """Each weight tensor's largest absolute entry (NaN or inf when it holds one), over every shard."""
        if self.config.fsdp:
            from msrnn.train.sharding import global_max_abs

            return global_max_abs(self.model)
        model = self.accelerator.unwrap_model(self.model)
        return {n: float(p.detach().abs().max()) for n, p in model.named_parameters() if p.numel()}

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        """Where resumable checkpoints go: ``<out>/checkpoints/step-NNNNNNN``."""
        return self.out_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        if not self.checkpoint_root.exists():
            return None
        ckpts = sorted(  # step-NNNNNNN only: a user's step-0000020.bak copy is not a checkpoint
            (p for p in self.checkpoint_root.glob("step-*")
             if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).exists()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint at the current step (every rank takes part; returns the path on rank 0)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.checkpoint_root / f"step-{self.step:07d}"
        with atomic_dir(path, overwrite=True) if acc.is_main_process else nullcontext() as tmp:
            tmp = self._from_main(str(tmp) if tmp is not None else None)
            if self.config.fsdp:  # every rank writes its shards (DCP) and its RNG states
                from msrnn.train.sharding import save_sharded

                save_sharded(Path(tmp), self.model, self.optimizer, acc.process_index)
            else:
                # Model (safetensors), optimizer and this rank's RNG states; Accelerate writes shared files on rank
                # 0. Its warning that tied weights (lm_head = embeddings) are saved once is expected: safetensors'
                # loader ties them back, and the resume tests compare every weight.
                with _quiet("accelerate.utils.other"):
                    acc.save_state(tmp, safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                state = {"step": self.step, "history": self.history, "config": self.config.to_dict(), "run": self.run,
                         "scheduler": self.scheduler.state_dict(),
                         "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
                         "processes": acc.num_processes, "resharded": self.resharded}
                write_json(Path(tmp) / STATE_FILE, state)
        acc.wait_for_everyone()  # the rename has happened before any rank goes on (or resumes from it)
        if not acc.is_main_process:
            return None
        old = sorted(self.checkpoint_root.glob("step-*"))[: -self.config.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return path

    def _from_main(self, value: str | None) -> str:
        """``value`` as rank 0 has it (the temp dir rank 0 made), on every rank."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the newest (or given) checkpoint on every rank; returns False if there is none."""
        path = Path(path) if path else self.latest_checkpoint()
        if path is None:
            old = sorted(self.checkpoint_root.glob(f"step-*/{_OLD_STATE_FILE}")) if self.checkpoint_root.exists() \
                else []
            if old:
                raise ModelLoadError(f"checkpoint {old[-1].parent} was written by an older msrnn (before Accelerate "
                                     "state saving); resume it with that version, or start a new --out")
            return False
        from msrnn.train.sharding import is_sharded_checkpoint

        sharded = is_sharded_checkpoint(path)
        if not (path / STATE_FILE).exists() or not (sharded or any(path.glob("*.safetensors"))):
            raise ModelLoadError(f"checkpoint {path} is incomplete; delete it to resume from an earlier one")
        if sharded != self.config.fsdp:
            raise ConfigError(f"checkpoint {path} was written by {'sharded (--fsdp)' if sharded else 'unsharded'} "
                              f"training; resume it {'with' if sharded else 'without'} --fsdp")
        try:
            state = json.loads((path / STATE_FILE).read_text())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError):
            raise ModelLoadError(f"checkpoint {path}'s {STATE_FILE} is corrupt; delete the checkpoint and resume"
                                 ) from None
        self._check_state_fields(path, state)
        saved_world, world = state.get("processes", 1), self.accelerator.num_processes
        saved_config = state.get("config") or {}
        reshard = sharded and saved_world != world
        if reshard:
            # DCP reshards weights and optimizer states; the global batch (micro-batches x processes) must stay.
            per_step = saved_config.get("grad_accum", 1) * saved_world
            if per_step % world or per_step // world != self.config.grad_accum:
                keep = f"--grad-accum {per_step // world}" if per_step % world == 0 else "a process count that " \
                    f"divides {per_step}"
                raise ConfigError(f"checkpoint {path} was trained with {saved_world} process(es) x grad_accum "
                                  f"{saved_config.get('grad_accum', 1)}; under {world} process(es) keep the global "
                                  f"batch with {keep}")
        self._check_same_recipe(path, saved_config, skip=("grad_accum",) if reshard else ())
        self._check_same_run(path, state.get("run"))
        if sharded:
            self._load_sharded(path, state, saved_world)
            return True
        if saved_world != world:
            # Each rank's RNG state and batch stream belong to one world size: another one is a different run.
            raise ConfigError(f"checkpoint {path} was trained with {saved_world} process(es), this run has "
                              f"{world}; resume with the same launch (checkpoints of --fsdp training reshard)")
        rng_file = path / f"random_states_{self.accelerator.process_index}.pkl"
        if not rng_file.exists():
            raise ModelLoadError(f"checkpoint {path} has no {rng_file.name}; delete it to resume from an earlier one")
        try:
            from accelerate.utils import load

            # Accelerate would log and skip an RNG file it cannot read, resuming another run: read it first.
            load(rng_file, weights_only=True)
            # Weights, optimizer and this rank's RNG states; Accelerate unpickles with weights_only=True.
            self.accelerator.load_state(str(path))
        except pickle.UnpicklingError:
            raise ModelLoadError(f"checkpoint {path} holds objects other than tensors and plain values (crafted, or "
                                 "not written by msrnn); refusing to unpickle it. Delete it or retrain") from None
        except RuntimeError as exc:
            if "size mismatch" in str(exc):  # a tensor of another shape: trained with another model size
                raise ModelLoadError(f"checkpoint {path} holds weights of another model size; resume with the same "
                                     "--preset (and vocabulary) it was trained with") from None
            if "Missing key" in str(exc) or "Unexpected key" in str(exc):
                raise ModelLoadError(f"checkpoint {path} does not match the model; resume with the same --preset"
                                     ) from None
            raise ModelLoadError(f"checkpoint {path} is corrupt ({type(exc).__name__}); delete it and resume"
                                 ) from None
        except (ValueError, KeyError):  # parameter groups differ: an older msrnn grouped the SSM differently
            raise ModelLoadError(f"checkpoint {path}'s optimizer state does not fit this model's parameter groups "
                                 "(written by an older msrnn?); start a new --out") from None
        except Exception as exc:
            raise ModelLoadError(f"checkpoint {path} is corrupt ({type(exc).__name__}); delete it and resume"
                                 ) from None
        self._restore(path, state)
        return True

    def _load_sharded(self, path: Path, state: dict[str, Any], saved_world: int) -> None:
        """Resume a DCP checkpoint: weights and optimizer states resharded to this launch, each rank's RNG states
        (a rank the checkpoint did not have keeps the seeded state, and the reshard is recorded)."""
        from msrnn.train.sharding import load_sharded

        load_sharded(path, self.model, self.optimizer, self.accelerator.process_index)
        self.resharded = [r for r in state.get("resharded") or [] if isinstance(r, dict)]
        if saved_world != self.accelerator.num_processes:
            self.resharded.append({"step": int(state["step"]), "from": saved_world,
                                   "to": self.accelerator.num_processes})
            log.warning("resumed %s (%d process(es)) under %d: the weights and optimizer states are resharded; "
                        "from here the batches are those of %d processes", path, saved_world,
                        self.accelerator.num_processes, self.accelerator.num_processes)
        self._restore(path, state)

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        """The plain-JSON part of a checkpoint: scheduler, step, log, curriculum."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        if self.curriculum is not None and state.get("curriculum"):
            self.curriculum.load_state_dict(state["curriculum"])
        self._start_scale = self._max_abs()
        log.info("resumed from %s at step %d", path, self.step)

    # Changing these mid-run would not take effect (the optimizer's saved lr wins over --lr) or would silently
    # make the resumed curve a different run; the length of the run (max_steps) and logging cadence may change.
    RECIPE_FIELDS = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "beta1", "beta2", "adam_eps",
                     "grad_clip", "grad_accum", "seed", "precision")

    def _check_same_recipe(self, path: Path, saved: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
        now = self.config.to_dict()
        changed = [f"{k} {saved[k]} -> {now[k]}" for k in self.RECIPE_FIELDS
                   if k in saved and saved[k] != now[k] and k not in skip]
        if changed:
            raise ConfigError(f"checkpoint {path} was trained with other settings ({'; '.join(changed)}); resume with "
                              "the flags it was trained with, or start a new --out")

    def _check_state_fields(self, path: Path, state: dict[str, Any]) -> None:
        """Every field resume reads, with the right type and consistent with each other (a crafted or damaged file
        is named, not a traceback; a step the history does not account for is not exported as trained)."""
        step, history = state.get("step"), state.get("history")
        if not isinstance(step, int) or isinstance(step, bool) or step < 1 or not isinstance(history, list) \
                or not all(isinstance(h, dict) for h in history) or not isinstance(state.get("scheduler"), dict) \
                or not isinstance(state.get("config", {}), dict):
            raise ModelLoadError(f"checkpoint {path}'s {STATE_FILE} has missing or mistyped fields (step, history, "
                                 "scheduler, config); delete the checkpoint and resume from an earlier one")
        if len(history) != step:
            raise ModelLoadError(f"checkpoint {path} claims step {step} but logs {len(history)} steps; its "
                                 f"{STATE_FILE} was edited or damaged: delete it and resume from an earlier one")
        if step > self.config.max_steps:  # exporting it would record a run of --max-steps that never happened
            raise ConfigError(f"checkpoint {path} is at step {step}, past --max-steps {self.config.max_steps}; pass "
                              f"--max-steps {step} or more to resume it")

    def _check_same_run(self, path: Path, saved: Any) -> None:
        if not isinstance(saved, dict) or self.run is None:
            return  # a checkpoint from before run settings were saved, or a caller that names none
        keys = sorted(set(saved) | set(self.run))
        changed = [f"{k} {saved.get(k)!r} -> {self.run.get(k)!r}" for k in keys if saved.get(k) != self.run.get(k)]
        if changed:
            raise ConfigError(f"checkpoint {path} was trained on other settings ({'; '.join(changed)}); resume with "
                              "the flags it was trained with, or start over with --overwrite")

    # ---------------------------------------------------------------- loop
    def _train_step(self) -> float:
        cfg, acc = self.config, self.accelerator
        self.model.train()
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(acc.device) for k, v in self.batch_fn(self.step, micro, acc.process_index).items()}
            last = micro == cfg.grad_accum - 1
            with self._no_sync(skip=not last), acc.autocast():
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

    def _no_sync(self, skip: bool) -> Any:
        """Keep this micro-batch's gradients local (all but the last micro-batch of a step)."""
        if self.config.fsdp:
            from msrnn.train.sharding import no_gradient_sync

            return no_gradient_sync(self.model, skip)
        return self.accelerator.no_sync(self.model) if skip else nullcontext()

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
                if acc.log_with:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
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
        if acc.log_with:
            acc.end_training()  # flush and close the trackers
        self.save_checkpoint()
        if acc.is_main_process:
            write_json(self.out_dir / "history.json", self.history)
        return TrainResult(step=self.step, history=self.history,
                           tokens=(self.step - start_step) * tokens_per_step, seconds=seconds)

    def check_final_weights(self) -> float:
        """The loss of the weights after the last update, on the next batch; refuse to export destroyed weights.

        The logged loss of a step is computed before its update, so one update that wrecks the model (``--lr 1e8``)
        would otherwise be exported with a healthy-looking final loss. Refused: non-finite weights; a weight tensor
        whose largest entry grew more than 1000-fold during this run to above 1000 (at ``--lr 1e8`` every weight
        becomes ~1e8 while a near-uniform model's loss hardly moves); or a loss more than twice (plus one nat) the
        run's first logged loss."""
        now = self._max_abs()
        bad = [n for n, v in now.items() if not math.isfinite(v)]
        if bad:
            raise NumericsError(f"after the last update {len(bad)} weight tensor(s) hold NaN or inf ({bad[0]}, ...); "
                                "nothing was exported. Lower --lr (or raise --warmup-steps) and train again")
        grown = [(n, before, a) for n, a in now.items() if (before := self._start_scale.get(n)) is not None]
        grown = [(n, b, a) for n, b, a in grown if a > 1000.0 and a > 1000.0 * max(b, 1e-6)]
        if grown:
            n, b, a = grown[0]
            raise NumericsError(f"an update destroyed the weights: {len(grown)} tensor(s) grew over 1000-fold during "
                                f"this run ({n}: largest entry {b:.3g} -> {a:.3g}, lr {self.config.lr:g}); nothing was "
                                "exported. Lower --lr and train again")
        was_training = self.model.training
        self.model.eval()
        try:
            batch = {k: v.to(self.accelerator.device)
                     for k, v in self.batch_fn(self.step, 0, self.accelerator.process_index).items()}
            with torch.no_grad(), self.accelerator.autocast():
                loss = float(self.loss_fn(self.model, batch))
        finally:
            self.model.train(was_training)
        losses = [h["loss"] for h in self.history if "loss" in h]
        first = losses[0] if losses else None
        if not math.isfinite(loss) or (first is not None and loss > 2 * first + 1):
            start = f" (the run started at {first:.3g})" if first is not None else ""
            raise NumericsError(f"after the last update the training loss is {loss:.3g}{start}: an update destroyed "
                                f"the weights (lr {self.config.lr:g}); nothing was exported. Lower --lr and train "
                                "again (the last checkpoint holds the weights before that update)")
        self.post_update_loss = loss
        return loss

    def export(self, out_dir: str | Path | None = None, meta: dict[str, Any] | None = None) -> Path:
        """Write the trained model (+ whatever ``save_extra`` adds, e.g. the tokenizer) as a model directory.

        Files are written to a temp dir and moved into place one by one; ``msrnn.json`` is written last and
        marks the directory complete.
        """
        out = Path(out_dir) if out_dir else self.out_dir
        self.check_final_weights()
        # Every rank takes part in gathering the full weights (a no-op copy under DDP, a gather under FSDP).
        if self.config.fsdp:
            from msrnn.train.sharding import full_weights

            weights = full_weights(self.model)
        else:
            weights = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return out
        model = self.accelerator.unwrap_model(self.model)
        weights = _in_dtype(_drop_tied_copies(weights, model), self.export_dtype, _fp32_modules(model))
        out.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out / ".export") as tmp:
            self.accelerator.unwrap_model(self.model).save_pretrained(str(tmp), state_dict=weights,
                                                                      safe_serialization=True)
            if self.save_extra:
                self.save_extra(tmp)
        staged = out / ".export"
        for f in sorted(staged.iterdir()):
            f.replace(out / f.name)
        staged.rmdir()
        resharded = {"resharded": self.resharded} if self.resharded else {}  # resumed under another process count
        write_json(out / "msrnn.json", {"step": self.step, **resharded, **(meta or {})})
        write_json(out / "train_config.json", self.config.to_dict())  # a rename: never writes through a link
        return out


def _tracking(report_to: str, out_dir: Path) -> dict[str, Any]:
    """The Accelerator's tracker arguments for ``--report-to``: logs under ``<out>/logs``; a tracker whose package
    is missing is refused up front (Accelerate would drop it with a warning and train unlogged)."""
    if report_to == "none":
        return {}
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[report_to]()
    if not available:
        raise ConfigError(f"--report-to {report_to} needs the {report_to} package; pip install {report_to}, or "
                          "drop --report-to")
    return {"log_with": report_to, "project_dir": str(out_dir / "logs")}


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as trackers take them (numbers, strings and booleans; anything else as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str) for k, v in config.items()}


def resolve_precision(precision: str) -> str:
    """``auto`` made concrete: bf16-mixed where the device computes in bf16 (CUDA with bf16), fp32 otherwise."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _fp32_modules(model: Any) -> set[str]:
    """Module names a model keeps in fp32 whatever it is loaded in (transformers' ``_keep_in_fp32_modules``)."""
    return set(getattr(model, "_keep_in_fp32_modules", None) or []) | \
        set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])


def _kept_fp32(name: str, keep: set[str]) -> bool:
    return any(k in name.split(".") for k in keep)


def _loaded_dtype(model: Any) -> torch.dtype:
    """The dtype most of the model's floating weights were loaded in (what the export is written in)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def cast_for_training(model: Any, precision: str) -> None:
    """Hold the weights (and so AdamW's states, which take their dtype) as ``precision`` says: fp32 masters for
    fp32 and bf16-mixed, bf16 for bf16 except the modules the model keeps in fp32. In place, before the optimizer
    exists; tied weights are one parameter and are cast once."""
    keep = _fp32_modules(model)
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        want = torch.bfloat16 if precision == "bf16" and not _kept_fp32(name, keep) else torch.float32
        if p.dtype != want:
            p.data = p.data.to(want)


def _drop_tied_copies(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``weights`` without the second name of a tied parameter (the head tied to the embedding): a gathered state
    dict (FSDP's) holds a separate copy under each name, which would store the table twice and untie it on load."""
    first: dict[int, str] = {}
    drop = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            drop.add(name)
        else:
            first[id(p)] = name
    return {k: v for k, v in weights.items() if k not in drop}


def _in_dtype(weights: dict[str, torch.Tensor], dtype: torch.dtype, keep: set[str]) -> dict[str, torch.Tensor]:
    """The state dict to export in the dtype the model was loaded in (fp32 masters of a bf16 checkpoint are written
    back as bf16), leaving the modules the model keeps in fp32 as they are."""
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype and not _kept_fp32(k, keep) else v
            for k, v in weights.items()}


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute every decoder layer in backward, through transformers' own switch (``activation_checkpointing_
    enable``, called ``gradient_checkpointing_enable`` before transformers 5.25); SUPRA, BST and RMT honour it
    (tested: same gradients, fewer saved activations). A model that does not support it is refused by name."""
    from msrnn.errors import ConfigError

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support activation checkpointing; drop "
                          "--activation-checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

