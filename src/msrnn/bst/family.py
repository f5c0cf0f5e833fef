"""BST's entry in the family registry (``msrnn.families``): its cost model and how a build sizes and makes it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SHRINK = ("block_size", 8, 8)  # the knob a build shrinks until the measured state fits: name, step, floor
# The size msrnn.models.selfcheck builds around a tiny Llama to verify this family on the installed transformers:
# 8-token blocks (a 24-token check crosses two boundaries).
SELF_CHECK_SIZING = {"block_size": 8, "state_size": 4}


def cost(a: Any, length: int, block: int = 64, ssm_state: int = 16, ssm_layers: int = 1, **_: Any
         ) -> dict[str, float]:
    """BST:SH as msrnn.bst builds it: the SSM and the cross-attention only in ``ssm_layers`` layers (multi-head
    context keys), grouped-query attention within blocks everywhere. State at its peak, one token short of a full
    block: every layer's block keys/values, plus the SSM layers' complex64 state and context K/V."""
    L = length
    attn_unit = 4 * a.heads * a.head_dim
    n_fft = 2 * L
    ssm = ssm_layers * (a.d * 5 * n_fft * math.log2(max(n_fft, 2)) + 2 * a.d * ssm_state * L)
    within = L * (block + 1) / 2  # causal attention inside blocks (average)
    cross = L * (block + 1) / 2  # SH: causal cross-attention to the block's own context states
    return {"flops": a.dense_flops_per_token() * L + ssm + a.layers * attn_unit * within
            + ssm_layers * attn_unit * cross, "state_bytes": state_bytes(a, block, ssm_state, ssm_layers, "sh")}


def state_bytes(a: Any, W: int, N: int, ssm_layers: int, variant: str) -> int:
    """Peak state of one sequence for block size W and SSM state size N."""
    kv_block = 2 * a.kv_heads * a.head_dim * (W - 1) * a.bytes_per_value  # grouped-query self-attention
    if variant == "slide":  # the current block and the whole previous one
        return a.layers * 2 * a.kv_heads * a.head_dim * (2 * W - 1) * a.bytes_per_value
    if variant == "sh":
        ctx_block = 2 * a.heads * a.head_dim * (W - 1) * a.bytes_per_value  # context keys: one per head
        return a.layers * kv_block + ssm_layers * (a.d * (N // 2) * 8 + ctx_block)
    rep = a.heads if variant == "mh" else 8  # MH: one SSM per head; MF: mf_states SSMs (default 8)
    ctx = 0 if variant == "mf" else 2 * a.heads * a.head_dim * (W - 1) * a.bytes_per_value
    mf_ctx = rep * a.d * a.bytes_per_value if variant == "mf" else 0
    return a.layers * kv_block + rep * a.d * (N // 2) * 8 + ctx + mf_ctx


def size_for_budget(a: Any, budget: int, bst_variant: str = "sh", **_: Any) -> dict[str, int] | None:
    """The largest block size W (a multiple of 8) for the largest SSM state N in 16/8/4/2 that fits."""
    ssm_layers = 0 if bst_variant == "slide" else 1
    for N in (16, 8, 4, 2):
        W, best = 8, None
        while W <= 4096 and state_bytes(a, W, N, ssm_layers, bst_variant) <= budget:
            best, W = W, W + 8
        if best is not None:
            return {"block_size": best, "state_size": N}
    return None


def make(base_model: Any, sizing: dict[str, int], seed: int = 0, bst_variant: str = "sh", **_: Any) -> Any:
    """The untrained BST at ``sizing``, started from the base decoder's weights."""
    from msrnn.bst.convert import from_llama

    return from_llama(base_model, variant=bst_variant, seed=seed, **sizing).train()


def as_lm(model: Any) -> Any:
    """A BST model as a streaming :class:`~msrnn.bst.BSTLM`."""
    from msrnn.bst.lm import BSTLM

    return BSTLM(model)


def load_trainable(path: Path) -> Any:
    """A saved BST as a trainable model."""
    from msrnn.models.loading import load_hf_causal_lm

    return load_hf_causal_lm(path)
