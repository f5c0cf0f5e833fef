"""SUPRA benchmarks, ratios measured side by side in one run.

* ops: chunked linear attention versus the naive token loop and versus causal softmax SDPA of the same shape;
  the crossover is the shortest measured length at which linear attention beats SDPA;
* decode: time per token of a SUPRA model after 1k versus 64k tokens of context (the state does not grow).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from msrnn.bench.rows import Row
from msrnn.bench.timing import median_time, timed_decode
from msrnn.protocol import prefill
from msrnn.supra.ops import chunked, chunked_ref, log_decay


@dataclass
class OpsRow(Row):
    """One length of ``bench supra`` ops: the linear-attention forms and causal softmax SDPA, ms each."""

    T: int
    chunked_ms: float
    sdpa_ms: float
    naive_ms: float | None = None  # the token loop, timed up to ``naive_max``

    @property
    def chunked_vs_naive(self) -> float | None:
        return None if self.naive_ms is None else self.naive_ms / self.chunked_ms

    @property
    def sdpa_over_chunked(self) -> float:
        return self.sdpa_ms / self.chunked_ms

    def to_json(self) -> dict[str, Any]:
        out = {"T": self.T, "chunked ms": self.chunked_ms, "sdpa ms": self.sdpa_ms}
        if self.naive_ms is not None:
            out.update({"naive ms": self.naive_ms, "chunked vs naive": self.chunked_vs_naive})
        return {**out, "sdpa / chunked": self.sdpa_over_chunked}


@dataclass
class SupraDecodeRow(Row):
    """Decode time per token after ``position`` tokens, and the state held there."""

    position: int
    ms_per_token: float
    state_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"position": self.position, "ms/token": self.ms_per_token, "state bytes": self.state_bytes}


@torch.inference_mode()
def bench_ops(lengths: list[int], heads: int = 8, dim: int = 64, chunk: int = 64, rounds: int = 3,
              naive_max: int = 16384) -> dict[str, Any]:
    """Linear-attention forms (naive, chunked) and softmax SDPA timed side by side."""
    rows = []
    lg = log_decay(heads)
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(1, heads, T, dim, generator=g) for _ in range(3))
        x = (q, k, v)
        row = OpsRow(T, 1e3 * median_time(lambda x=x: chunked(*x, lg, chunk_size=chunk), rounds),
                     1e3 * median_time(lambda x=x: F.scaled_dot_product_attention(*x, is_causal=True), rounds))
        if T <= naive_max:
            row.naive_ms = 1e3 * median_time(lambda x=x: chunked_ref(*x, lg), max(1, rounds - 2))
        rows.append(row)
    cross = next((r.T for r in rows if r.sdpa_over_chunked > 1.0), None)
    return {"rows": rows, "crossover_T": cross, "heads": heads, "dim": dim, "chunk": chunk}


@torch.inference_mode()
def bench_decode(model: Any, positions: list[int], steps: int = 32, rounds: int = 3,
                 prefill_chunk: int = 4096) -> dict[str, Any]:
    """Decode ms/token at short and long positions, interleaved."""
    from msrnn.supra.lm import SupraLM

    lm = SupraLM(model)
    vocab = model.config.vocab_size
    states = {}
    for pos in positions:
        g = torch.Generator().manual_seed(pos)
        ids = torch.randint(0, vocab, (1, pos), generator=g)
        states[pos] = prefill(lm, ids, prefill_chunk)[1]
    times: dict[int, list[float]] = {p: [] for p in positions}
    for _ in range(rounds):  # interleaved so both positions see the same machine conditions
        for pos in positions:
            seconds, states[pos] = timed_decode(lm, states[pos], steps, vocab)  # warm-up and CUDA sync included
            times[pos].append(seconds / steps)
    rows = [SupraDecodeRow(p, 1e3 * statistics.median(times[p]), lm.state_nbytes(states[p])) for p in positions]
    return {"rows": rows, "ratio_last_first": rows[-1].ms_per_token / rows[0].ms_per_token}
