"""One recipe for training a model of any family on a memory task, with the segment schedule as an option.

The loss is the RMT's (Bulatov et al., 2023): cross-entropy over the label set's first tokens at the final position
(a decoder answers through its LM head, so the trained model is still an ordinary streaming LM and every family is
scored the same way); an encoder classifier (the RMT report's encoder) uses its [CLS] head. The final position's
logits come from the family's spec (``FamilySpec.final_logits``: an RMT aligns its segments to the sample's end).

Lengths are whole task segments and follow one of two schedules:

* :class:`StepSchedule` (``msrnn compare --task-steps``, :func:`task_tune`): an equal share of the run at 1, 2, ...,
  ``max_segments`` segments, advanced by step count alone and one length per batch, so every model sees exactly the
  same samples (the same tokens for every family) and no padding enters a recurrent state;
* :class:`~msrnn.train.curriculum.Curriculum` (``msrnn train rmt``): a stage advanced by validation accuracy or a
  step budget, lengths mixed within a batch (left-padded) so shorter ones are not forgotten.

Batches are a pure function of (step, micro-step, rank) and the schedule's state, which the checkpoint holds.
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
from msrnn.train.curriculum import Curriculum


@dataclass
class TaskTrainConfig:
    """A memory task to train on: task, batch size, validation samples and the noise source."""
    task: str = "memorize"
    batch_size: int = 16
    val_samples: int = 64
    noise: str = "stdlib"

    def __post_init__(self) -> None:
        from msrnn.tasks import TASKS

        TASKS.get(self.task)
        if self.batch_size < 1 or self.val_samples < 1:
            raise ConfigError("batch_size and val_samples must be >= 1")


class StepSchedule:
    """An equal share of ``steps`` at 1, 2, ..., ``max_segments`` segments, one length per batch; validation at
    ``max_segments``. Nothing to checkpoint: the length is a function of the step."""

    def __init__(self, max_segments: int, steps: int) -> None:
        self.max_segments, self.steps = max_segments, steps

    def segments_at(self, step: int) -> int:
        """Segments of every sample at ``step``."""
        return min(self.max_segments, 1 + step * self.max_segments // self.steps)

    def segments_for_batch(self, rng: random.Random, batch_size: int, step: int) -> list[int]:
        return [self.segments_at(step)] * batch_size

    def val_segments(self) -> int:
        return self.max_segments

    def val_seed(self, segments: int) -> int:
        return 10_000


class CurriculumSchedule:
    """The validation-driven :class:`~msrnn.train.curriculum.Curriculum` as a schedule (the trainer checkpoints and
    advances the curriculum itself)."""

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum

    def segments_for_batch(self, rng: random.Random, batch_size: int, step: int) -> list[int]:
        return self.curriculum.segments_for_batch(rng, batch_size)

    def val_segments(self) -> int:
        return self.curriculum.stage

    def val_seed(self, segments: int) -> int:
        return 10_000 + segments


def train_on_task(model: Any, tokenizer: Any, spec: Any, task_cfg: TaskTrainConfig, segment_length: int,
                  schedule: StepSchedule | CurriculumSchedule, train_cfg: Any, out: Path, meta: dict[str, Any],
                  resume: bool = False, progress: bool = True) -> Any:
    """Train ``model`` (a trainable module of the family ``spec``) on ``task_cfg.task`` in the shared trainer; returns
    the trainer (export is the caller's, with what it records)."""
    from msrnn.tasks.noise import noise_sentences
    from msrnn.train.trainer import Trainer

    S = segment_length
    gen = TaskGenerator(task_cfg.task, tokenizer, noise_sentences(task_cfg.noise, "train"))
    val_gen = TaskGenerator(task_cfg.task, tokenizer, noise_sentences(task_cfg.noise, "val"))
    if gen.min_length() > S:
        raise ConfigError(f"a {S}-token segment cannot hold the {task_cfg.task!r} facts and question "
                          f"({gen.min_length()} tokens); use a longer segment length")
    classifier = spec.task_head(model) == "classifier"
    label_ids = None if classifier else torch.tensor(gen.label_token_ids())
    spec.record_task(model, task_cfg.task, gen.labels)
    pad = (tokenizer.pad_token_id or 0) if classifier else 0

    def loss_and_preds(m: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if label_ids is None:  # encoder classifier: its own head and loss
            out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            return out["loss"], out["logits"].argmax(-1)
        ids = label_ids.to(batch["input_ids"].device)
        logits = spec.final_logits(m, batch["input_ids"], batch["attention_mask"])[:, ids].float()  # [B, labels]
        return F.cross_entropy(logits, batch["labels"]), logits.argmax(-1)

    def batch_fn(step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        rng = random.Random(hash((train_cfg.seed, step, micro, rank)))
        # Every rank runs rank 0's segment counts on its own samples: a sharded (--fsdp) model gathers each layer's
        # weights at every call, so the ranks must make the same calls. Rank 0's draws are as they always were.
        shared = rng if rank == 0 else random.Random(hash((train_cfg.seed, step, micro, 0)))
        segs = schedule.segments_for_batch(shared, task_cfg.batch_size, step)
        return collate(gen.batch([n * S for n in segs], rng), pad)

    val_cache: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def val_fn(m: Any) -> dict[str, float]:
        n = schedule.val_segments()
        if n not in val_cache:
            rng = random.Random(schedule.val_seed(n))
            val_cache[n] = collate(val_gen.batch([n * S] * task_cfg.val_samples, rng), pad)
        device = next(m.parameters()).device
        batch = {k: v.to(device) for k, v in val_cache[n].items()}
        losses, correct = [], 0
        for i in range(0, task_cfg.val_samples, task_cfg.batch_size):
            part = {k: v[i : i + task_cfg.batch_size] for k, v in batch.items()}
            loss, pred = loss_and_preds(m, part)
            losses.append(float(loss) * len(part["labels"]))
            correct += int((pred == part["labels"]).sum())
        return {"val_loss": sum(losses) / task_cfg.val_samples, "val_acc": correct / task_cfg.val_samples}

    trainer = Trainer(model, train_cfg, batch_fn, out, loss_fn=lambda m, b: loss_and_preds(m, b)[0], val_fn=val_fn,
                      save_extra=lambda d: tokenizer.save_pretrained(str(d)), progress=progress,
                      curriculum=schedule.curriculum if isinstance(schedule, CurriculumSchedule) else None,
                      run={**vars(task_cfg), **meta})
    if resume:
        trainer.resume()
    return trainer


def train_task(model: Any, tokenizer: Any, spec: Any, task_cfg: TaskTrainConfig, curriculum_cfg: Any,
               train_cfg: Any, out: Path, meta: dict[str, Any], resume: bool = False,
               progress: bool = True) -> tuple[Any, Any]:
    """Train on a memory task with the validation-driven segment curriculum (``msrnn train rmt``), in segments of
    the length the model's config records, then export; returns (trainer, training result)."""
    curriculum = Curriculum(curriculum_cfg)
    _, S = spec.trained_task(model)
    if S is None:
        raise ConfigError(f"the {spec.name} family records no segment length; train it with task_tune")
    trainer = train_on_task(model, tokenizer, spec, task_cfg, S, CurriculumSchedule(curriculum), train_cfg, out,
                            meta, resume=resume, progress=progress)
    result = trainer.train()
    trainer.export(out, {**meta, "family": spec.name, "task": task_cfg.task, "curriculum": curriculum.log,
                         "final_segments": curriculum.stage})
    return trainer, result


@dataclass
class TaskTuneConfig:
    """Equal task fine-tuning for every family (``msrnn compare --task-steps``): task, steps, segments, batch, lr."""

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

    def schedule(self) -> StepSchedule:
        """The step schedule these settings imply."""
        return StepSchedule(self.max_segments, self.steps)

    def segments_at(self, step: int) -> int:
        """Curriculum by steps: an equal share of the run at 1, 2, ..., max_segments segments."""
        return self.schedule().segments_at(step)

    @property
    def tokens(self) -> int:
        """Training tokens of the whole run (the same for every model)."""
        return sum(self.segments_at(s) for s in range(self.steps)) * self.segment_length * self.batch_size


def task_tune(model: Any, tokenizer: Any, cfg: TaskTuneConfig, out: Path, meta: dict[str, Any], spec: Any,
              progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``model`` (of the family ``spec``) on ``cfg.task`` with the step schedule and export it to ``out``
    (``msrnn.json`` records the task); returns the final validation at ``max_segments``."""
    from msrnn.train import TrainConfig

    train_cfg = TrainConfig(max_steps=cfg.steps, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 10), eval_every=0,
                            seed=cfg.seed)
    task_cfg = TaskTrainConfig(task=cfg.task, batch_size=cfg.batch_size, val_samples=cfg.val_samples, noise=cfg.noise)
    trainer = train_on_task(model, tokenizer, spec, task_cfg, cfg.segment_length, cfg.schedule(), train_cfg, out,
                            {**cfg.__dict__, **meta}, resume=True, progress=progress)
    trainer.train()
    model.eval()
    final = trainer.val_fn(model)
    trainer.export(out, {**meta, "task": cfg.task, "task_tune": {**cfg.__dict__, "tokens": cfg.tokens},
                         "task_val_acc": final["val_acc"]})
    return final
