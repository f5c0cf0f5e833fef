"""RMT's entry in the family registry (``msrnn.families``): its cost model and how a build sizes and makes it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SHRINK = ("segment_length", 1, 8)  # the knob a build shrinks until the measured state fits: name, step, floor
# The size msrnn.models.selfcheck builds around a tiny Llama to verify this family on the installed transformers:
# 8-token segments (a 24-token check crosses two).
SELF_CHECK_SIZING = {"segment_length": 8, "num_memory_tokens": 2}


def cost(a: Any, length: int, segment: int = 512, memory: int = 16, **_: Any) -> dict[str, float]:
    """Full attention inside segments of ``segment`` tokens plus 2 * ``memory`` memory slots; the state between
    segments is the memory vectors."""
    seg = segment + 2 * memory
    attn_unit = 4 * a.heads * a.head_dim
    per_seg = a.dense_flops_per_token() * seg + a.layers * attn_unit * seg * (seg + 1) / 2
    return {"flops": math.ceil(length / segment) * per_seg, "state_bytes": memory * a.d * a.bytes_per_value}


def size_for_budget(a: Any, budget: int, **_: Any) -> dict[str, int] | None:
    """The state is the memory plus the current segment's keys and values (m read slots + up to S - 1 tokens), so S
    takes what m leaves; m is the largest of 16/8/4/2 that leaves a segment of at least 4m tokens."""
    for m in (16, 8, 4, 2):
        S = (budget - m * a.d * a.bytes_per_value) // a.kv_bytes_per_slot() - m + 1
        if S >= 4 * m:
            return {"segment_length": int(min(S, 1024)), "num_memory_tokens": m}
    return None


def train_seq_len(seq_len: int, sizing: dict[str, int]) -> int:
    """Whole segments per training sequence, so every sequence ends on a segment boundary."""
    return max(1, seq_len // sizing["segment_length"]) * sizing["segment_length"]


def make(base_model: Any, sizing: dict[str, int], **_: Any) -> Any:
    """The untrained RMT at ``sizing`` around the base decoder."""
    from msrnn.rmt.wrapper import MemoryWrapper

    return MemoryWrapper.wrap(base_model.train(), **sizing)


def as_lm(model: Any) -> Any:
    """A wrapper as a streaming :class:`~msrnn.rmt.lm.RMTLM`."""
    from msrnn.rmt.lm import RMTLM

    return RMTLM(model)


def load_trainable(path: Path) -> Any:
    """A saved RMT as its trainable wrapper."""
    from msrnn.rmt.lm import load_rmt

    return load_rmt(str(path)).wrapper
