"""Long-context probes (:mod:`msrnn.tasks.longctx`) scored the same way for every family, through the protocol.

Each sample's prompt is streamed in chunks into a fresh state; from that one state (copied, never re-read) the
scorer

* ranks the task's candidate answers by log-likelihood (``rank_acc``: the true one ranks first; chance is
  ``1 / candidates``), which says something even where a small model cannot produce the answer,
* decodes greedily and checks the answer text (``exact``: every expected value appears in the output; ``recall``:
  the share that does, RULER's string-match score),
* and, for a family whose state keeps tokens (KV eviction), reports **needle retention**: per layer, the share of the
  answer values' tokens still held when the question has been read (:meth:`msrnn.families.FamilySpec.retention`).

A row aggregates the samples of one (length, depth).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msrnn.errors import ConfigError
from msrnn.families import lm_family
from msrnn.generate import continue_from
from msrnn.protocol import StatefulLM, chunk_held_nbytes, fork_state, peak_state_bytes, split, stream_chunks
from msrnn.tasks.longctx import LongCtxGenerator, Probe


@dataclass
class LongCtxConfig:
    """Samples per cell, prefill chunk, greedy answer length (None: the longest candidate's tokens + 4), seed."""

    samples: int = 5
    chunk_size: int = 512
    max_new_tokens: int | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("samples", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")


def cell_seed(seed: int, task: str, length: int, depth: float | None) -> int:
    """The seed of one (task, length, depth) cell: the same in every process (Python's ``hash`` of a string is not,
    under hash randomisation)."""
    import hashlib

    return int(hashlib.sha256(repr((seed, task, length, depth)).encode()).hexdigest()[:16], 16)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def read(lm: StatefulLM, ids: Sequence[int], chunk: int, state: Any = None) -> tuple[torch.Tensor, Any, int]:
    """Stream ``ids`` (one sequence) in chunks from ``state`` (default fresh): (next-token logits [V] after the last
    token, the state, the most bytes the state held between chunks and inside them)."""
    x = torch.tensor([list(ids)])
    last, peak = None, 0
    for step in stream_chunks(lm, split(x, chunk), state, last_only=True):
        last, state = step.logits[0, -1], step.state
        peak = max(peak, chunk_held_nbytes(lm, state))
    if last is None:
        raise ConfigError("nothing to read: the text is empty")
    return last.float(), state, peak


@torch.inference_mode()
def continuation_score(lm: StatefulLM, state: Any, next_logits: torch.Tensor, ids: Sequence[int],
                       chunk: int = 512) -> tuple[float, bool]:
    """(log p(ids | what ``state`` has read), whether every token of ``ids`` is the greedy one), ``next_logits`` [V]
    being the logits after the read; the continuation runs on a copy, fed ``chunk`` tokens at a time, so ``state``
    is left as it was and can score the next continuation."""
    logits = [next_logits[None].float()]  # [1, V]: predicts the first token
    if len(ids) > 1:
        for step in stream_chunks(lm, split(torch.tensor([list(ids[:-1])]), chunk), fork_state(state)):
            logits.append(step.logits[0].float())
    allv = torch.cat(logits)  # [len(ids), V]
    target = torch.tensor(list(ids), device=allv.device)
    lp = allv.log_softmax(-1).gather(1, target[:, None])[:, 0]
    return float(lp.sum()), bool((allv.argmax(-1) == target).all())


def score_probe(lm: StatefulLM, probe: Probe, tokenizer: Any, cfg: LongCtxConfig) -> dict[str, Any]:
    """One sample: rank of the true candidate, the greedy answer's exact match and recall, retention, state bytes."""
    next_logits, state, peak = read(lm, probe.input_ids, cfg.chunk_size)
    cands = [_encode(tokenizer, " " + c) for c in probe.candidates]
    scores = [continuation_score(lm, state, next_logits, c, cfg.chunk_size)[0] for c in cands]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    n = cfg.max_new_tokens or max(map(len, cands)) + 4
    eos = getattr(tokenizer, "eos_token_id", None)
    new = continue_from(lm, next_logits[None], fork_state(state), n, eos_token_id=eos)
    text = tokenizer.decode(new[0].tolist())
    found = [v in text for v in probe.answers]
    positions = [p for a, b in probe.value_spans for p in range(a, b)]
    retention = lm_family(lm).retention(lm, state, positions) if positions else None
    return {"rank_correct": best == probe.label, "chance": 1 / len(cands), "exact": all(found),
            "recall": sum(found) / len(found), "answer": text, "retention": retention, "state_bytes": peak}


def evaluate_longctx(lm: StatefulLM, generator: LongCtxGenerator, lengths: Sequence[int],
                     depths: Sequence[float | None], cfg: LongCtxConfig, progress: bool = False
                     ) -> list[dict[str, Any]]:
    """One row per (length, depth): exact match, recall, rank accuracy (and its chance level), mean needle retention
    per layer (where the family has it), the peak state bytes of one sequence while reading the prompt (at every
    offset; the answer tokens decoded after it are not counted) and seconds, over ``cfg.samples`` seeded samples."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from msrnn.ui import err_console

    if not isinstance(lm, StatefulLM):
        raise ConfigError(f"{type(lm).__name__} has no next-token stream to probe (an encoder classifier)")
    tokenizer = generator.tokenizer
    cells = [(n, d) for n in lengths for d in (depths if generator.task.uses_depth else [None])]
    rows = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, console=err_console) as bar:
        job = bar.add_task(generator.task.name, total=len(cells) * cfg.samples)
        for n, d in cells:
            rng = random.Random(cell_seed(cfg.seed, generator.task.name, n, d))
            t0, got = time.perf_counter(), []
            for _ in range(cfg.samples):
                got.append(score_probe(lm, generator.sample(n, d, rng), tokenizer, cfg))
                bar.advance(job)
            kept = [g["retention"] for g in got if g["retention"] is not None]
            per_layer = [sum(layer) / len(kept) for layer in zip(*kept, strict=True)] if kept else None
            rows.append({"task": generator.task.name, "length": n, "depth": d, "samples": len(got),
                         "exact": sum(g["exact"] for g in got) / len(got),
                         "recall": sum(g["recall"] for g in got) / len(got),
                         "rank_acc": sum(g["rank_correct"] for g in got) / len(got),
                         "chance": sum(g["chance"] for g in got) / len(got),
                         "retention": None if per_layer is None else sum(per_layer) / len(per_layer),
                         "retention_by_layer": per_layer,
                         "peak_state_bytes": peak_state_bytes(lm, n, max(g["state_bytes"] for g in got)),
                         "seconds": time.perf_counter() - t0, "answers": [g["answer"] for g in got]})
    return rows


def write_lm_eval_tasks(folder: str | Path, generators: Sequence[LongCtxGenerator], lengths: Sequence[int],
                        depths: Sequence[float], samples: int, seed: int = 1234) -> list[str]:
    """lm-evaluation-harness task folders for these probes: per task and length, a local JSONL of the same seeded
    samples :func:`evaluate_longctx` scores and a ``multiple_choice`` YAML (``acc`` = the true answer ranked first
    among the candidates), all tagged ``msrnn_longctx``. Run them with ``python -m msrnn.harness run --tasks
    msrnn_longctx --include_path FOLDER``; nothing is downloaded. Returns the task names."""
    import json

    from msrnn.io import atomic_file

    folder = Path(folder)
    names = []
    for gen in generators:
        for n in lengths:
            name = f"msrnn_{gen.task.name}_{n}"
            rows = []
            for d in depths if gen.task.uses_depth else [None]:
                rng = random.Random(cell_seed(seed, gen.task.name, n, d))  # the samples evaluate_longctx draws
                for _ in range(samples):
                    p = gen.sample(n, d, rng)
                    rows.append({"prompt": gen.tokenizer.decode(p.input_ids), "choices": list(p.candidates),
                                 "gold": p.label, "depth": d, "answers": list(p.answers), "tokens": n})
            data = folder / f"{name}.jsonl"
            with atomic_file(data, "w") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in rows))
            yaml = (f"task: {name}\ntag: msrnn_longctx\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {data.resolve()}\ntest_split: test\noutput_type: multiple_choice\n"
                    "doc_to_text: '{{prompt}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
                    "metric_list:\n  - metric: acc\n")
            with atomic_file(folder / f"{name}.yaml", "w") as fh:
                fh.write(yaml)
            names.append(name)
    return names
