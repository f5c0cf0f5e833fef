"""The plain HF family's entry in the family registry (``msrnn.families``): the full-cache cost model."""

from __future__ import annotations

from typing import Any


def cost(a: Any, length: int, **_: Any) -> dict[str, float]:
    """Softmax attention over the whole KV cache: attention FLOPs grow as L^2, state as L."""
    pairs = length * (length + 1) / 2
    return {"flops": a.dense_flops_per_token() * length + a.layers * 4 * a.heads * a.head_dim * pairs,
            "state_bytes": a.kv_bytes_per_slot() * length}
