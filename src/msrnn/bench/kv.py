"""KV eviction speed, measured side by side: decode versus context, and prefill cost per prefill mode.

Decode (:func:`run_kv_bench`): for each context length every variant is prefilled to that length, then
single-token decode steps are timed. Bounded caches prefill with ``oneshot`` eviction (the state after prefill is
what decoding sees; the prefill mode does not change decode cost).

Prefill (:func:`run_kv_prefill_bench`): the same prompt fed in fixed chunks from an empty state through the full
cache and through bounded caches with each prefill mode (``exact`` is the token-by-token protocol, ``oneshot``
TOVA's one eviction per chunk), optionally also through the exact prefill's slow readable twin.

Variants are measured in interleaved rounds and the median kept, so the ratios compare like with like on a
noisy machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from msrnn.errors import ConfigError
from msrnn.protocol import prefill


@dataclass
class KVBenchConfig:
    """Contexts, budget, decode steps and rounds of ``bench kv``."""

    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    budget: int = 512
    steps: int = 32
    rounds: int = 3
    prefill_chunk: int = 1024

    def __post_init__(self) -> None:
        if not self.contexts or min(self.contexts) < 2:
            raise ConfigError("contexts must be >= 2 tokens")
        if self.budget < 1 or self.steps < 1 or self.rounds < 1:
            raise ConfigError("budget, steps and rounds must be >= 1")


@torch.inference_mode()
def _prefill(lm, ctx: int, vocab: int, chunk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, ctx), generator=g)
    return prefill(lm, ids, chunk)[1]


@torch.inference_mode()
def _decode_time(lm, state, steps: int, vocab: int) -> float:
    tok = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(2):  # warm-up
        _, state = lm.forward_chunk(tok, state)
    t0 = time.perf_counter()
    for i in range(steps):
        tok.fill_(i % vocab)
        _, state = lm.forward_chunk(tok, state)
    return (time.perf_counter() - t0) / steps


def run_kv_bench(model: Any, cfg: KVBenchConfig, progress: Any = None) -> dict[str, Any]:
    """Decode tokens/s and KV bytes, full cache vs window and TOVA, interleaved rounds."""
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import HFCausalLM

    vocab = model.config.vocab_size
    full = HFCausalLM(model)
    variants = {"full": full, **{f"{p}@{cfg.budget}": apply_kv(full, KVSettings(p, cfg.budget, prefill="oneshot"))
                                 for p in ("window", "tova")}}
    rows = []
    for ctx in cfg.contexts:
        states = {name: _prefill(lm, ctx, vocab, cfg.prefill_chunk, seed=ctx) for name, lm in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(cfg.rounds):
            for name, lm in variants.items():
                # Decoding grows the full cache by `steps` tokens per round: negligible next to `ctx`.
                times[name].append(_decode_time(lm, states[name], cfg.steps, vocab))
        row: dict[str, Any] = {"context": ctx}
        for name, lm in variants.items():
            t = statistics.median(times[name])
            row[f"{name} tok/s"] = 1.0 / t
            row[f"{name} bytes"] = lm.state_nbytes(states[name])
        row["tova/full speed"] = row[f"tova@{cfg.budget} tok/s"] / row["full tok/s"]
        row["tova overhead vs window"] = row[f"window@{cfg.budget} tok/s"] / row[f"tova@{cfg.budget} tok/s"] - 1
        rows.append(row)
        if progress:
            progress(row)
        del states
    return {"budget": cfg.budget, "steps": cfg.steps, "rounds": cfg.rounds, "rows": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


@dataclass
class KVPrefillBenchConfig:
    """Prompt length, chunk, budget, policies and rounds of ``bench kv --mode prefill``."""

    tokens: int = 8192
    chunk: int = 512
    budget: int = 512
    policies: list[str] = field(default_factory=lambda: ["tova", "h2o", "window"])
    rounds: int = 3
    reference: bool = False  # also time the exact prefill's readable twin (slow: one query at a time)

    def __post_init__(self) -> None:
        if self.tokens < 2 or self.chunk < 1 or self.budget < 1 or self.rounds < 1:
            raise ConfigError("tokens must be >= 2 and chunk, budget and rounds >= 1")
        if not self.policies:
            raise ConfigError("give at least one policy, e.g. --policies tova")
        if self.budget >= self.tokens:
            raise ConfigError(f"budget ({self.budget}) must be below the prompt length ({self.tokens}), or nothing "
                              "is evicted; raise --tokens or lower --budget")


@torch.inference_mode()
def _prefill_time(lm, ids: torch.Tensor, chunk: int) -> float:
    t0 = time.perf_counter()
    prefill(lm, ids, chunk)
    return time.perf_counter() - t0


def run_kv_prefill_bench(model: Any, cfg: KVPrefillBenchConfig, progress: Any = None) -> dict[str, Any]:
    """Prefill tokens/s of the full cache and of each policy under each prefill mode, interleaved rounds."""
    from msrnn.kv import KVEvictionLM, KVSettings, apply_kv
    from msrnn.models import HFCausalLM

    full = HFCausalLM(model)
    variants: dict[str, Any] = {"full": full}
    for p in cfg.policies:
        for mode in ("exact", "oneshot"):
            variants[f"{p}@{cfg.budget} {mode}"] = apply_kv(full, KVSettings(p, cfg.budget, prefill=mode))
        if cfg.reference:
            variants[f"{p}@{cfg.budget} exact (reference twin)"] = KVEvictionLM(
                model, KVSettings(p, cfg.budget).make_policy(), reference=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, cfg.tokens), generator=g)
    _prefill_time(full, ids[:, : min(cfg.tokens, 2 * cfg.chunk)], cfg.chunk)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(cfg.rounds):
        for name, lm in variants.items():
            if "reference" in name and r > 0:
                continue  # the twin is ~10x slower; one round bounds the run time and is enough for its ratio
            times[name].append(_prefill_time(lm, ids, cfg.chunk))
            if progress:
                progress(name, cfg.tokens / times[name][-1])
    full_tps = cfg.tokens / statistics.median(times["full"])
    rows = []
    for name, ts in times.items():
        tps = cfg.tokens / statistics.median(ts)
        rows.append({"variant": name, "tok/s": tps, "vs full": tps / full_tps, "rounds": len(ts)})
    return {"tokens": cfg.tokens, "chunk": cfg.chunk, "budget": cfg.budget, "rounds": cfg.rounds, "rows": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
