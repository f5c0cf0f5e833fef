"""SUPRA benchmarks, ratios measured side by side in one run.

* ops: chunked linear attention versus the naive token loop and versus causal softmax SDPA of the same shape;
  the crossover is the shortest measured length at which linear attention beats SDPA;
* decode: time per token of a SUPRA model after 1k versus 64k tokens of context (the state does not grow).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F

from msrnn.bench.timing import median_time, timed_decode
from msrnn.protocol import prefill
from msrnn.supra.ops import chunked, log_decay, naive_recurrent


@torch.inference_mode()
def bench_ops(lengths: list[int], heads: int = 8, dim: int = 64, chunk: int = 64, rounds: int = 3,
              naive_max: int = 16384) -> dict[str, Any]:
    """Linear-attention forms (naive, chunked) and softmax SDPA timed side by side."""
    rows = []
    lg = log_decay(heads)
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(1, heads, T, dim, generator=g) for _ in range(3))
        row: dict[str, Any] = {"T": T}
        x = (q, k, v)
        row["chunked ms"] = 1e3 * median_time(lambda x=x: chunked(*x, lg, chunk_size=chunk), rounds)
        row["sdpa ms"] = 1e3 * median_time(lambda x=x: F.scaled_dot_product_attention(*x, is_causal=True), rounds)
        if T <= naive_max:
            row["naive ms"] = 1e3 * median_time(lambda x=x: naive_recurrent(*x, lg), max(1, rounds - 2))
            row["chunked vs naive"] = row["naive ms"] / row["chunked ms"]
        row["sdpa / chunked"] = row["sdpa ms"] / row["chunked ms"]
        rows.append(row)
    cross = next((r["T"] for r in rows if r["sdpa / chunked"] > 1.0), None)
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
    rows = [{"position": p, "ms/token": 1e3 * statistics.median(times[p]), "state bytes": lm.state_nbytes(states[p])}
            for p in positions]
    return {"rows": rows, "ratio_last_first": rows[-1]["ms/token"] / rows[0]["ms/token"]}
