"""Fine-tune a model of any family on the long-context probes (:mod:`msrnn.tasks.longctx`) with a length
curriculum, so the probes' pictures show what a family can do rather than what an untrained model cannot.

The loss is the language-modelling loss of the true answer after the prompt (teacher forcing: the prompt's own tokens
are not scored), through the family's trainable module. Lengths follow the step schedule of
:class:`msrnn.train.tasks.StepSchedule`: an equal share of the run at each length in ``lengths``, in order, one
length per batch (no padding enters a recurrent state), so every family sees exactly the same samples. Needle depths
are drawn uniformly in [0, 1]. Training samples come from the haystack's *train* split and training seeds;
``msrnn eval longctx`` reads the *test* split with its own seeds, so every figure is on held-out haystack and samples.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from msrnn.errors import ConfigError


@dataclass
class LongCtxTuneConfig:
    """Tasks, the length curriculum (tokens, in order), batch size and the training haystack."""

    tasks: list[str] = field(default_factory=lambda: ["passkey", "niah_single"])
    lengths: list[int] = field(default_factory=lambda: [256, 512])
    batch_size: int = 4
    data: str = "stdlib"  # its train split is the training haystack

    def __post_init__(self) -> None:
        from msrnn.tasks.longctx import LONGCTX_TASKS

        if not self.tasks:
            raise ConfigError("name at least one long-context task, e.g. --tasks passkey,niah_single")
        for t in self.tasks:
            LONGCTX_TASKS.get(t)
        if not self.lengths or min(self.lengths) < 1 or self.batch_size < 1:
            raise ConfigError("lengths and batch_size must be >= 1")
        if list(self.lengths) != sorted(self.lengths):
            raise ConfigError(f"the length curriculum runs short to long; give --lengths in increasing order, got "
                              f"{','.join(map(str, self.lengths))}")

    def length_at(self, step: int, steps: int) -> int:
        """The curriculum: an equal share of a ``steps``-step run at each length, in order."""
        return self.lengths[min(len(self.lengths) - 1, step * len(self.lengths) // steps)]

    def tokens(self, steps: int) -> int:
        """Prompt tokens of a ``steps``-step run (the same for every family)."""
        return sum(self.length_at(s, steps) for s in range(steps)) * self.batch_size


def answer_batch(generators: list[Any], length: int, batch_size: int, rng: random.Random
                 ) -> dict[str, torch.Tensor]:
    """``batch_size`` prompts of ``length`` tokens, each followed by its true answer and right-padded to the longest
    answer: input ids [B, T] and a mask [B, T] of the answer tokens. Every model here is causal, so the padding
    after an answer changes nothing the loss reads."""
    rows = []
    for _ in range(batch_size):
        gen = rng.choice(generators)
        p = gen.sample(length, rng.random(), rng)
        answer = gen.tokenizer(" " + p.candidates[p.label], add_special_tokens=False)["input_ids"]
        rows.append((p.input_ids, list(answer)))
    n = max(len(a) for _, a in rows)
    ids = torch.zeros(batch_size, length + n, dtype=torch.long)  # [B, T]
    mask = torch.zeros(batch_size, length + n, dtype=torch.bool)
    for i, (prompt, ans) in enumerate(rows):
        ids[i, : length + len(ans)] = torch.tensor(prompt + ans)
        mask[i, length : length + len(ans)] = True
    return {"input_ids": ids, "answer_mask": mask}


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer tokens (each predicted from the position before it)."""
    ids, mask = batch["input_ids"], batch["answer_mask"]
    logits = model(input_ids=ids)["logits"][:, :-1].float()  # [B, T - 1, V]
    target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)


def tune_longctx(model: Any, tokenizer: Any, cfg: LongCtxTuneConfig, train_cfg: Any, out: Path,
                 meta: dict[str, Any], resume: bool = False, progress: bool = True) -> tuple[Any, Any]:
    """Train ``model`` (any family's trainable causal LM: the loss reads its ``logits``) on the probes in the shared
    trainer and export it to ``out`` (``msrnn.json`` records the tuning); returns (trainer, training result)."""
    from msrnn.tasks.longctx import LongCtxGenerator
    from msrnn.tasks.noise import noise_sentences
    from msrnn.train.trainer import Trainer

    haystack = noise_sentences(cfg.data, "train")
    generators = [LongCtxGenerator(t, tokenizer, haystack) for t in cfg.tasks]
    for g in generators:  # every task must fit the shortest length: refused now, not at step 1
        g.sample(cfg.lengths[0], 0.5, random.Random(0))
    steps = train_cfg.max_steps

    def batch_fn(step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        rng = random.Random(hash((train_cfg.seed, step, micro, rank)))
        return answer_batch(generators, cfg.length_at(step, steps), cfg.batch_size, rng)

    trainer = Trainer(model, train_cfg, batch_fn, out, loss_fn=answer_loss,
                      save_extra=lambda d: tokenizer.save_pretrained(str(d)), progress=progress,
                      run={**asdict(cfg), **meta})
    if resume:
        trainer.resume()
    result = trainer.train()
    trainer.export(out, {**meta, "longctx_tune": {**asdict(cfg), "tokens": cfg.tokens(steps)}})
    return trainer, result
