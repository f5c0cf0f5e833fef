"""Training hyper-parameters shared by pretraining, SUPRA uptraining, BST and RMT."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from msrnn.errors import ConfigError

# How weights, optimizer states and the forward are held while training (``--precision``):
# - fp32: everything in fp32;
# - bf16-mixed: fp32 master weights and AdamW states, the forward under bf16 autocast. A bf16 checkpoint is trained
#   this way by default: in bf16 an update below the weight's rounding step (about 1/256 of it) is lost, and so is
#   weight decay;
# - bf16: weights and states in bf16 (half the memory, small updates lost; only when asked for by name). Modules a
#   model keeps in fp32 (transformers' ``_keep_in_fp32_modules``/``_strict``: BST's SSM kernel) stay in fp32;
# - auto: bf16-mixed where the device computes in bf16 (CUDA with bf16), fp32 otherwise.
# The exported model takes the dtype the weights were loaded in (a bf16 checkpoint stays bf16 on disk).
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
TRACKERS = ("none", "tensorboard", "wandb")  # Accelerate's trackers msrnn offers (--report-to)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training command, validated when built."""
    max_steps: int
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio: a slow decay (see LMBatches' docstring)
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    eval_every: int = 100  # 0 disables periodic validation
    save_every: int = 0  # 0 = a resumable checkpoint only at the end
    keep_checkpoints: int = 1
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # one of PRECISIONS
    activation_checkpointing: bool = False  # recompute each layer in backward (less memory, about a third slower)
    fsdp: bool = False  # shard weights, gradients and optimizer states over the processes (PyTorch FSDP2)
    report_to: str = "none"  # one of TRACKERS: each step's log also goes to that tracker (through Accelerate)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; use cosine or constant")
        if self.adam_eps <= 0:
            raise ConfigError(f"adam_eps must be > 0, got {self.adam_eps}")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.report_to not in TRACKERS:
            raise ConfigError(f"unknown tracker {self.report_to!r}; use {', '.join(TRACKERS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")
        for name in ("eval_every", "save_every", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be >= 1")

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warmup, then cosine or flat."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (saved in checkpoints and model directories)."""
        return asdict(self)
