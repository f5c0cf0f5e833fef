"""SUPRA's entry in the family registry (``msrnn.families``): its cost model and how a build sizes and makes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHRINK = ("feature_dim", 2, 2)  # the knob a build shrinks until the measured state fits: name, step, floor
# The size msrnn.models.selfcheck builds around a tiny Llama to verify this family on the installed transformers:
# an 8-wide feature map.
SELF_CHECK_SIZING = {"feature_dim": 8}


def cost(a: Any, length: int, feature_dim: int | None = None, **_: Any) -> dict[str, float]:
    """Linear attention: phi maps plus a [H, F, d] fp32 state per layer (constant; F = feature_dim, default d)."""
    phi = 2 * (a.heads * a.head_dim) ** 2 + 2 * (a.kv_heads * a.head_dim) ** 2
    rec = 4 * a.heads * a.head_dim * a.head_dim  # state update k^T v and readout q S
    return {"flops": a.dense_flops_per_token() * length + a.layers * (phi + rec) * length,
            "state_bytes": a.layers * a.heads * (feature_dim or a.head_dim) * a.head_dim * 4}


def size_for_budget(a: Any, budget: int, **_: Any) -> dict[str, int] | None:
    """The largest even feature width F whose state fits ``budget`` bytes."""
    F = (budget // (a.layers * a.heads * a.head_dim * 4)) // 2 * 2  # the largest even width that fits
    return {"feature_dim": int(F)} if F >= 2 else None


def make(base_model: Any, sizing: dict[str, int], seed: int = 0, **_: Any) -> Any:
    """The untrained SUPRA conversion of the base decoder at ``sizing``."""
    from msrnn.supra.convert import convert

    return convert(base_model, feature_dim=sizing["feature_dim"], seed=seed).train()


def as_lm(model: Any) -> Any:
    """A SUPRA model as a streaming :class:`~msrnn.supra.SupraLM`."""
    from msrnn.supra.lm import SupraLM

    return SupraLM(model)


def load_trainable(path: Path) -> Any:
    """A saved SUPRA model as a trainable model."""
    from msrnn.models.loading import load_hf_causal_lm

    return load_hf_causal_lm(path)
