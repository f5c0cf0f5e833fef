"""Training an RMT on a memory task with the segment curriculum, in the shared trainer.

Decoder: the loss is the cross-entropy of the label set's first tokens at the final position (classification
on the last segment through the LM head, so the trained model is still an ordinary streaming LM and every
family is scored the same way). Encoder: the [CLS] head's cross-entropy on the last segment, as in the report.
Batches are a pure function of (step, micro-step, rank) and the curriculum stage, which the checkpoint holds.
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
from msrnn.train.curriculum import Curriculum, CurriculumConfig


@dataclass
class TaskTrainConfig:
    """A memory task for curriculum training: task, batch size and noise source."""
    task: str = "memorize"
    batch_size: int = 16
    val_samples: int = 64
    noise: str = "stdlib"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.val_samples < 1:
            raise ConfigError("batch_size and val_samples must be >= 1")


def _loss_and_preds(model: Any, batch: dict[str, torch.Tensor], label_ids: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if label_ids is None:  # encoder classifier
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out["loss"], out["logits"].argmax(-1)
    logits = model.final_logits(batch["input_ids"], batch["attention_mask"])[:, label_ids]  # [B, labels]
    return F.cross_entropy(logits, batch["labels"]), logits.argmax(-1)


def train_task(model: Any, tokenizer: Any, task_cfg: TaskTrainConfig, curriculum_cfg: CurriculumConfig,
               train_cfg: Any, out: Path, meta: dict[str, Any], resume: bool = False,
               progress: bool = True) -> tuple[Any, Any]:
    """Train an RMT on a memory task with the segment curriculum in the shared trainer, then export it."""
    from msrnn.tasks.noise import noise_sentences
    from msrnn.train.trainer import Trainer

    S = model.config.segment_length
    gen = TaskGenerator(task_cfg.task, tokenizer, noise_sentences(task_cfg.noise, "train"))
    val_gen = TaskGenerator(task_cfg.task, tokenizer, noise_sentences(task_cfg.noise, "val"))
    if gen.min_length() > S:
        raise ConfigError(f"a {S}-token segment cannot hold the {task_cfg.task!r} facts and question "
                          f"({gen.min_length()} tokens); use a longer --segment-length")
    encoder = model.config.backbone_kind == "encoder"
    label_ids = None if encoder else torch.tensor(gen.label_token_ids())
    model.config.task, model.config.label_names = task_cfg.task, gen.labels
    curriculum = Curriculum(curriculum_cfg)
    pad = (tokenizer.pad_token_id or 0) if encoder else 0

    def batch_fn(step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        rng = random.Random(hash((train_cfg.seed, step, micro, rank)))
        segs = curriculum.segments_for_batch(rng, task_cfg.batch_size)
        return collate(gen.batch([n * S for n in segs], rng), pad)

    val_cache: dict[int, dict[str, torch.Tensor]] = {}

    def val_fn(m: Any) -> dict[str, float]:
        n = curriculum.stage
        if n not in val_cache:
            rng = random.Random(10_000 + n)
            val_cache[n] = collate(val_gen.batch([n * S] * task_cfg.val_samples, rng), pad)
        device = next(m.parameters()).device
        batch = {k: v.to(device) for k, v in val_cache[n].items()}
        ids = None if label_ids is None else label_ids.to(device)
        losses, correct = [], 0
        for i in range(0, task_cfg.val_samples, task_cfg.batch_size):
            part = {k: v[i : i + task_cfg.batch_size] for k, v in batch.items()}
            loss, pred = _loss_and_preds(m, part, ids)
            losses.append(float(loss) * len(part["labels"]))
            correct += int((pred == part["labels"]).sum())
        return {"val_loss": sum(losses) / task_cfg.val_samples, "val_acc": correct / task_cfg.val_samples}

    def loss_fn(m: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = None if label_ids is None else label_ids.to(batch["input_ids"].device)
        return _loss_and_preds(m, batch, ids)[0]

    def save_extra(path: Path) -> None:
        tokenizer.save_pretrained(str(path))

    trainer = Trainer(model, train_cfg, batch_fn, out, loss_fn=loss_fn, val_fn=val_fn,
                      save_extra=save_extra, progress=progress, curriculum=curriculum,
                      run={**vars(task_cfg), **meta})
    if resume:
        trainer.resume()
    result = trainer.train()
    trainer.export(out, {**meta, "family": "rmt", "task": task_cfg.task, "curriculum": curriculum.log,
                         "final_segments": curriculum.stage})
    return trainer, result
