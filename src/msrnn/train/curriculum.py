"""Segment curriculum for recurrent-memory training (Bulatov et al., 2023): start short, add segments as the
model masters each length.

The stage (the longest number of segments currently trained) advances by one when validation accuracy reaches
``threshold`` or after ``stage_steps`` steps at the stage, up to ``max_segments``. The trainer saves the stage in
every checkpoint, so a resumed run continues at the same stage with the same batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from msrnn.errors import ConfigError


@dataclass
class CurriculumConfig:
    """The segment curriculum: the most segments, the accuracy threshold and the steps per stage."""
    max_segments: int = 5
    start: int = 1
    threshold: float = 0.95  # validation accuracy that moves to the next stage
    stage_steps: int = 0  # 0 = no step budget: wait for the threshold
    current_share: float = 0.5  # share of a batch at the current stage; the rest is spread over shorter lengths

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.max_segments:
            raise ConfigError(f"curriculum start must be in [1, max_segments={self.max_segments}], got {self.start}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"curriculum threshold must be in (0, 1], got {self.threshold}")
        if self.stage_steps < 0:
            raise ConfigError("stage_steps must be >= 0")
        if not 0 < self.current_share <= 1:
            raise ConfigError(f"current_share must be in (0, 1], got {self.current_share}")


class Curriculum:
    """Adds a segment when validation accuracy reaches the threshold or the stage's step budget runs out."""

    def __init__(self, config: CurriculumConfig) -> None:
        self.config = config
        self.stage = config.start
        self.stage_start = 0
        self.log: list[dict[str, int]] = []

    def segments_for_batch(self, rng: random.Random, batch_size: int) -> list[int]:
        """Segments of each sample: lengths vary within a batch so shorter lengths are not forgotten."""
        out = []
        for _ in range(batch_size):
            if self.stage == 1 or rng.random() < self.config.current_share:
                out.append(self.stage)
            else:
                out.append(rng.randint(1, self.stage - 1))
        return out

    def update(self, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """After a validation at ``step``: maybe advance; returns what to log."""
        acc = record.get("val_acc")
        passed = acc is not None and acc >= self.config.threshold
        timed_out = self.config.stage_steps and step - self.stage_start >= self.config.stage_steps
        if self.stage < self.config.max_segments and (passed or timed_out):
            self.log.append({"step": step, "from": self.stage, "to": self.stage + 1,
                             "reason": "threshold" if passed else "step budget"})
            self.stage += 1
            self.stage_start = step
        return {"segments": self.stage}

    def state_dict(self) -> dict[str, Any]:
        """The stage and its log, for checkpoints."""
        return {"stage": self.stage, "stage_start": self.stage_start, "log": list(self.log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stage and log from a checkpoint."""
        self.stage, self.stage_start, self.log = int(state["stage"]), int(state["stage_start"]), list(state["log"])
