"""Token-level samples of the memory tasks: facts inserted between noise sentences, the question at the end.

Lengths are exact token counts (``segments * segment_length`` for a segmented model), so "4 segments" means the
same input for every family. Facts go between whole noise sentences and keep their order (as BABILong inserts
them); the sample records where each fact landed so tests and analyses can check it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from msrnn.errors import ConfigError
from msrnn.tasks.templates import TASKS, TaskSpec

ANSWER_PROMPT = "Answer:"


@dataclass
class TaskSample:
    """One task sample: token ids, the answer's label index and where the facts are."""

    input_ids: list[int]
    label: int  # index into the task's label set
    fact_spans: list[tuple[int, int]] = field(default_factory=list)  # token [start, end) of each fact
    question_start: int = 0
    facts: tuple[str, ...] = ()
    question: str = ""


def encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of several texts, without special tokens."""
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


class TaskGenerator:
    """Draws samples of one task at any token length, reproducibly from a seed.

    ``noise`` is a list of sentences (see :func:`msrnn.tasks.noise.noise_sentences`); each is tokenized once.
    """

    def __init__(self, task: str | TaskSpec, tokenizer: Any, noise: list[str]) -> None:
        self.task = TASKS.get(task) if isinstance(task, str) else task
        if not noise:
            raise ConfigError("the noise corpus is empty; name text with English sentences (--noise PATH)")
        self.tokenizer = tokenizer
        self.noise = [ids for ids in encode_many(tokenizer, [" " + s for s in noise]) if ids]
        self.labels = list(self.task.labels)

    def label_token_ids(self) -> list[int]:
        """The first token of each label after the answer prompt (what a causal LM predicts); must be distinct."""
        firsts = [ids[0] for ids in encode_many(self.tokenizer, [" " + label for label in self.labels])]
        if len(set(firsts)) != len(firsts):
            raise ConfigError(f"labels {self.labels} share a first token under this tokenizer; a causal LM cannot "
                              "tell them apart at one position (retrain the tokenizer or rename the labels)")
        return firsts

    def min_length(self) -> int:
        """A safe lower bound on the tokens a sample needs (facts + question, with the longest templates)."""
        rng = random.Random(0)
        longest = 0
        for _ in range(64):
            ep = self.task.make(rng)
            ids = encode_many(self.tokenizer, [" " + f for f in ep.facts] + [f" {ep.question} {ANSWER_PROMPT}"])
            longest = max(longest, sum(len(x) for x in ids))
        return longest + 4

    def sample(self, length: int, rng: random.Random) -> TaskSample:
        """One sample of exactly ``length`` tokens."""
        ep = self.task.make(rng)
        *facts, question = encode_many(self.tokenizer,
                                       [" " + f for f in ep.facts] + [f" {ep.question} {ANSWER_PROMPT}"])
        budget = length - len(question) - sum(len(f) for f in facts)
        if budget < 0:
            raise ConfigError(f"length {length} is too short for task {self.task.name!r} (its facts and question "
                              f"need {length - budget} tokens); use longer segments or more of them")
        noise: list[list[int]] = []
        total = 0
        while total < budget:
            sent = self.noise[rng.randrange(len(self.noise))]
            noise.append(sent[: budget - total])  # the last sentence is cut to fill the length exactly
            total += len(noise[-1])
        if self.task.placement == "start":
            slots = [0] * len(facts)
        else:
            slots = sorted(rng.randint(0, len(noise)) for _ in facts)  # sorted: the facts keep their order
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        fi = 0
        for i in range(len(noise) + 1):
            while fi < len(facts) and slots[fi] == i:
                spans.append((len(ids), len(ids) + len(facts[fi])))
                ids.extend(facts[fi])
                fi += 1
            if i < len(noise):
                ids.extend(noise[i])
        q_start = len(ids)
        ids.extend(question)
        return TaskSample(ids, self.labels.index(ep.answer), spans, q_start, ep.facts, ep.question)

    def batch(self, lengths: list[int], rng: random.Random) -> list[TaskSample]:
        """Samples of the given lengths, from ``rng``."""
        return [self.sample(n, rng) for n in lengths]


def collate(samples: list[TaskSample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-aligned batch (left padding) so every question ends the sequence: input_ids, attention_mask, labels."""
    T = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, T - len(s.input_ids) :] = torch.tensor(s.input_ids)
        mask[i, T - len(s.input_ids) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([s.label for s in samples])}
