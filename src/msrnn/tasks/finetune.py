"""Fine-tune a model of any family on a memory task with the same recipe, so task accuracy compares methods.

The loss is the RMT's (Bulatov et al., 2023): cross-entropy over the label set's first tokens at the final
position. Lengths follow a curriculum in whole task segments, advanced by step count alone (not by validation
accuracy, as ``msrnn train rmt`` does) so that every model sees exactly the same samples: the same number of
tokens for every family. Every batch has one length, so no padding enters a recurrent state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from msrnn.errors import ConfigError
from msrnn.tasks.samples import TaskGenerator, collate


@dataclass
class TaskTuneConfig:
    """Equal task fine-tuning for every family: task, steps, segments, batch, lr."""

    task: str = "memorize"
    segment_length: int = 128  # the task's length unit: samples are 1..max_segments of these
    max_segments: int = 4
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    val_samples: int = 64
    noise: str = "stdlib"
    seed: int = 0

    def __post_init__(self) -> None:
        from msrnn.tasks import TASKS

        TASKS.get(self.task)
        if min(self.segment_length, self.max_segments, self.steps, self.batch_size, self.val_samples) < 1:
            raise ConfigError("segment_length, max_segments, steps, batch_size and val_samples must be >= 1")

    def segments_at(self, step: int) -> int:
        """Curriculum by steps: an equal share of the run at 1, 2, ..., max_segments segments."""
        return min(self.max_segments, 1 + step * self.max_segments // self.steps)

    @property
    def tokens(self) -> int:
        """Training tokens of the whole run (the same for every model)."""
        return sum(self.segments_at(s) for s in range(self.steps)) * self.segment_length * self.batch_size


def last_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the final position [B, V], for an RMT wrapper or any causal LM."""
    if hasattr(model, "final_logits"):
        return model.final_logits(input_ids)
    return model(input_ids=input_ids)["logits"][:, -1]


def task_tune(model: Any, tokenizer: Any, cfg: TaskTuneConfig, out: Path, meta: dict[str, Any],
              progress: bool = True) -> dict[str, Any]:
    """Train ``model`` on ``cfg.task`` and export it to ``out`` (``msrnn.json`` records the task); returns the
    final validation accuracy at ``max_segments``."""
    from msrnn.tasks.noise import noise_sentences
    from msrnn.train import TrainConfig
    from msrnn.train.trainer import Trainer

    gen = TaskGenerator(cfg.task, tokenizer, noise_sentences(cfg.noise, "train"))
    val_gen = TaskGenerator(cfg.task, tokenizer, noise_sentences(cfg.noise, "val"))
    if gen.min_length() > cfg.segment_length:
        raise ConfigError(f"a {cfg.segment_length}-token segment cannot hold the {cfg.task!r} facts and question "
                          f"({gen.min_length()} tokens); use a longer segment length")
    label_ids = torch.tensor(gen.label_token_ids())
    if hasattr(model.config, "label_names"):  # an RMT's config names its task, as ``msrnn train rmt`` leaves it
        model.config.task, model.config.label_names = cfg.task, gen.labels

    def batch_fn(step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        rng = random.Random(hash((cfg.seed, step, micro, rank)))
        n = cfg.segments_at(step)
        return collate(gen.batch([n * cfg.segment_length] * cfg.batch_size, rng))

    def loss_fn(m: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = last_logits(m, batch["input_ids"])[:, label_ids.to(batch["input_ids"].device)]
        return F.cross_entropy(logits.float(), batch["labels"])

    val = collate(val_gen.batch([cfg.max_segments * cfg.segment_length] * cfg.val_samples, random.Random(10_000)))

    def val_fn(m: Any) -> dict[str, float]:
        correct = 0
        with torch.no_grad():
            for i in range(0, cfg.val_samples, cfg.batch_size):
                ids = val["input_ids"][i : i + cfg.batch_size]
                pred = last_logits(m, ids)[:, label_ids].argmax(-1)
                correct += int((pred == val["labels"][i : i + cfg.batch_size]).sum())
        return {"val_acc": correct / cfg.val_samples}

    train_cfg = TrainConfig(max_steps=cfg.steps, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 10), eval_every=0,
                            seed=cfg.seed)
    trainer = Trainer(model, train_cfg, batch_fn, out, loss_fn=loss_fn, val_fn=val_fn,
                      save_extra=lambda d: tokenizer.save_pretrained(str(d)), progress=progress,
                      run={**cfg.__dict__, **meta})
    trainer.resume()
    trainer.train()
    model.eval()
    final = val_fn(model)
    trainer.export(out, {**meta, "task": cfg.task, "task_tune": {**cfg.__dict__, "tokens": cfg.tokens},
                         "task_val_acc": final["val_acc"]})
    return final
