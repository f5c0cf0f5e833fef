"""Accuracy on the memory tasks versus input length, the same for every family.

A causal LM answers with the label whose first token gets the highest next-token logit after the question's
"Answer:" prompt (the sample is streamed through the msrnn protocol, so KV eviction, SUPRA, BST and RMT are
scored identically and their state is measured while they read). An encoder RMT classifier answers with its
head. Samples of one length are generated from a fixed seed, so every family sees the same inputs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from msrnn.errors import ConfigError
from msrnn.families import lm_family
from msrnn.protocol import StatefulLM, chunk_held_nbytes, peak_state_bytes, split, stream_chunks, tensor_nbytes
from msrnn.tasks.samples import TaskGenerator, TaskSample, collate
from msrnn.ui import err_console


@dataclass
class TaskEvalConfig:
    """Settings of a task-accuracy evaluation, validated when built."""
    samples: int = 100
    batch_size: int = 8
    chunk_size: int = 512
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")


def _is_classifier(model: Any) -> bool:
    """An encoder RMT classifier answers with its head; it is not a StatefulLM (no next-token stream)."""
    return not isinstance(model, StatefulLM)


@torch.no_grad()
def _answer_stream(lm: Any, batch: list[TaskSample], label_ids: list[int], chunk: int) -> tuple[list[int], int]:
    ids = torch.tensor([s.input_ids for s in batch])  # [B, T]: one length per call
    if lm_family(lm).answers_itself(lm):
        # A model whose task training scores the answer its own way (RMT: segments aligned to the end) is scored
        # the same way here; streaming from the start would cut other segments when T % S != 0.
        return lm.final_logits(ids)[:, label_ids].argmax(-1).tolist(), 0
    peak, last = 0, None
    for step in stream_chunks(lm, split(ids, chunk), last_only=True):
        last = step.logits[:, -1]
        peak = max(peak, chunk_held_nbytes(lm, step.state))
    return last[:, label_ids].argmax(-1).tolist(), peak // len(batch)


@torch.no_grad()
def _answer_classifier(model: Any, batch: list[TaskSample]) -> tuple[list[int], int]:
    out = model(**{k: v for k, v in collate(batch, model.config.pad_token_id or 0).items() if k != "labels"})
    return out["logits"].argmax(-1).tolist(), tensor_nbytes(out["memory"][0])


def evaluate_task(model: Any, generator: TaskGenerator, lengths: Sequence[int], cfg: TaskEvalConfig,
                  samples: dict[int, list[TaskSample]] | None = None, progress: bool = False
                  ) -> list[dict[str, Any]]:
    """One row per length: tokens, accuracy, peak state bytes per sequence, seconds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    classify = _is_classifier(model)
    label_ids = None if classify else generator.label_token_ids()
    if not classify:  # profile the state once at the longest length; every shorter one reads the memoised prefix
        peak_state_bytes(model, max(lengths, default=0), 0)
    rows = []
    with Progress(TextColumn("[bold]task {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress, console=err_console) as bar:
        for n in lengths:
            data = (samples or {}).get(n)
            if data is None:
                rng = random.Random(cfg.seed * 1_000_003 + n)
                data = [generator.sample(n, rng) for _ in range(cfg.samples)]
            job = bar.add_task(f"{n:,} tokens", total=len(data))
            correct, peak, t0 = 0, 0, time.perf_counter()
            for i in range(0, len(data), cfg.batch_size):
                batch = data[i : i + cfg.batch_size]
                if classify:
                    pred, state = _answer_classifier(model, batch)
                elif len({len(s.input_ids) for s in batch}) == 1:
                    pred, state = _answer_stream(model, batch, label_ids, cfg.chunk_size)
                else:  # a stream batch needs one length (BABILong files mix them): one sample at a time
                    pred, state = [], 0
                    for s in batch:
                        p, b = _answer_stream(model, [s], label_ids, cfg.chunk_size)
                        pred, state = pred + p, max(state, b)
                correct += sum(p == s.label for p, s in zip(pred, batch, strict=True))
                peak = max(peak, state)
                bar.advance(job, len(batch))
            seconds = time.perf_counter() - t0
            if not classify:
                peak = peak_state_bytes(model, max(len(s.input_ids) for s in data), peak)
            rows.append({"tokens": n, "accuracy": correct / len(data), "samples": len(data),
                         "peak_state_bytes": peak, "seconds": seconds})
    return rows
