"""Stream a very long token sequence through any StatefulLM and record memory and time along the way.

Checks what bounded-state families promise: resident memory stays flat, time per chunk stays constant (total time
linear in length), state bytes stay constant, and no logit becomes NaN/inf over 1M+ tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from msrnn.bench.rows import Row
from msrnn.bench.timing import rss_mib
from msrnn.errors import ConfigError
from msrnn.protocol import stream_chunks


@dataclass
class StreamRow(Row):
    """A sample of a long stream: tokens so far, resident memory, the state's bytes and time per chunk since the
    previous sample."""

    tokens: int
    rss_mib: float
    state_bytes: int
    ms_per_chunk: float


@torch.inference_mode()
def stream_bench(lm: Any, tokens: int, chunk: int = 512, samples: int = 16, seed: int = 0) -> dict[str, Any]:
    """Stream ``tokens`` random tokens in chunks: RSS, state bytes, ms per chunk, NaN count."""
    if tokens < chunk or chunk < 1:
        raise ConfigError("need tokens >= chunk >= 1")
    g = torch.Generator().manual_seed(seed)
    n_chunks = tokens // chunk
    every = max(1, n_chunks // samples)
    rows, nonfinite, t_start, t_last, done = [], 0, time.perf_counter(), time.perf_counter(), 0
    # The input is made chunk by chunk, so memory measures the model, not a 1M-token tensor.
    chunks = (torch.randint(0, lm.vocab_size, (1, chunk), generator=g) for _ in range(n_chunks))
    for i, step in enumerate(stream_chunks(lm, chunks)):
        logits, state = step.logits, step.state
        nonfinite += int((~torch.isfinite(logits)).sum())
        done += chunk
        if (i + 1) % every == 0 or i == n_chunks - 1:
            now = time.perf_counter()
            span = done - (rows[-1].tokens if rows else 0)
            rows.append(StreamRow(done, rss_mib(), lm.state_nbytes(state),
                                  1e3 * (now - t_last) / max(1, span // chunk)))
            t_last = now
    total = time.perf_counter() - t_start
    steady = rows[1:] or rows  # the first sample includes warm-up
    return {"tokens": done, "chunk": chunk, "seconds": total, "tokens_per_s": done / total, "nonfinite": nonfinite,
            "rss_first_mib": steady[0].rss_mib, "rss_last_mib": rows[-1].rss_mib,
            "ms_per_chunk_first": steady[0].ms_per_chunk, "ms_per_chunk_last": rows[-1].ms_per_chunk,
            "rows": rows}
