"""KV eviction's entry in the family registry (``msrnn.families``): its cost model. A KV-bounded model is a plain
HF model with a policy applied (``msrnn.kv.apply_kv``), so it is loaded and built as the ``hf`` family."""

from __future__ import annotations

from typing import Any


def cost(a: Any, length: int, budget: int = 512, score_row: bool = True, **_: Any) -> dict[str, float]:
    """``budget`` slots per layer; TOVA adds one probability row per token (``score_row``)."""
    L, k = length, budget
    attn_unit = 4 * a.heads * a.head_dim
    # Token t attends to min(t - 1, k) kept slots plus itself.
    pairs = sum(min(t - 1, k) + 1 for t in range(1, min(L, k + 1) + 1)) + max(0, L - k - 1) * (k + 1)
    extra = a.layers * 2 * a.heads * a.head_dim * (k + 1) * max(0, L - k) if score_row else 0
    return {"flops": a.dense_flops_per_token() * L + a.layers * attn_unit * pairs + extra,
            "state_bytes": a.kv_bytes_per_slot() * min(L, k)}
