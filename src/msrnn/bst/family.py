"""BST's spec (``msrnn.families``): its cost model and how a build sizes, makes and loads it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from msrnn.errors import ConfigError
from msrnn.families import Cost, FamilySpec, Knobs


@dataclass(frozen=True)
class BSTKnobs(Knobs):
    """BST's size (block size W, SSM state size N), the bounded variant (sh, mh, mf or slide) and, for the cost
    model, how many layers carry the SSM (None: as msrnn builds it, one in the middle layer; none for slide)."""

    block_size: int = 64
    state_size: int = 16
    variant: str = "sh"
    ssm_layers: int | None = None

    SIZE_FIELDS = ("block_size", "state_size")

    def __post_init__(self) -> None:
        from msrnn.bst.config import VARIANTS

        if self.variant not in VARIANTS or self.variant == "full":
            raise ConfigError(f"a BST knob's variant must be a bounded variant (sh, mh, mf, slide), got "
                              f"{self.variant!r}")
        self.require_ints("BST", ("block_size", "state_size"))
        self.require_ints("BST", ("ssm_layers",), minimum=0)

    def ssm_count(self) -> int:
        """Layers carrying the SSM."""
        built = 0 if self.variant == "slide" else 1
        return built if self.ssm_layers is None else self.ssm_layers


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


class BSTSpec(FamilySpec):
    """The Block-State Transformer: an SSM over the stream feeding attention within blocks."""

    name = "bst"
    help = "Block-State Transformer (SSM + block attention)"
    knobs_type: ClassVar[type[Knobs]] = BSTKnobs
    loadable = True
    trainable = True
    shrink_step = ("block_size", 8, 8)
    # 8-token blocks around msrnn.models.selfcheck's tiny Llama (a 24-token check crosses two boundaries).
    self_check = {"block_size": 8, "state_size": 4}
    marker = "D"

    def cost(self, arch: Any, length: int, knobs: Knobs) -> Cost:
        """BST:SH as msrnn.bst builds it: the SSM and the cross-attention only in ``ssm_layers`` layers (multi-head
        context keys), grouped-query attention within blocks everywhere. State at its peak, one token short of a
        full block: every layer's block keys/values, plus the SSM layers' complex64 state and context K/V (by the
        variant)."""
        L, block = length, knobs.block_size
        attn_unit = 4 * arch.heads * arch.head_dim
        n_fft = 2 * L
        ssm = knobs.ssm_count() * (arch.d * 5 * n_fft * math.log2(max(n_fft, 2))
                                  + 2 * arch.d * knobs.state_size * L)
        within = L * (block + 1) / 2  # causal attention inside blocks (average)
        cross = L * (block + 1) / 2  # SH: causal cross-attention to the block's own context states
        return {"flops": arch.dense_flops_per_token() * L + ssm + arch.layers * attn_unit * within
                + knobs.ssm_count() * attn_unit * cross,
                "state_bytes": state_bytes(arch, block, knobs.state_size, knobs.ssm_count(), knobs.variant)}

    def size_for_state_bytes(self, arch: Any, state_bytes_: int, knobs: Knobs) -> Knobs | None:
        """The largest block size W (a multiple of 8) for the largest SSM state N in 16/8/4/2 that fits."""
        for N in (16, 8, 4, 2):
            W, best = 8, None
            while W <= 4096 and state_bytes(arch, W, N, knobs.ssm_count(), knobs.variant) <= state_bytes_:
                best, W = W, W + 8
            if best is not None:
                return knobs.replace(block_size=best, state_size=N)
        return None

    def probe(self, knobs: Knobs) -> tuple[int, int]:
        return 2 * knobs.block_size + 16, 1  # two blocks, one token at a time: every in-block offset

    def make(self, base_model: Any, knobs: Knobs, seed: int = 0) -> Any:
        """The untrained BST at ``knobs``, started from the base decoder's weights (one SSM layer, in the
        middle, as ``from_llama`` places it; none for ``slide``)."""
        from msrnn.bst.convert import from_llama

        if knobs.ssm_layers is not None and knobs.ssm_layers != knobs.replace(ssm_layers=None).ssm_count():
            raise ConfigError(f"a BST built from a base decoder has {knobs.replace(ssm_layers=None).ssm_count()} SSM "
                              f"layer(s); ssm_layers={knobs.ssm_layers} is for the cost model only")
        return from_llama(base_model, variant=knobs.variant, seed=seed, **knobs.sizing()).train()

    def as_lm(self, model: Any) -> Any:
        from msrnn.bst.lm import BSTLM

        return BSTLM(model)

    def load(self, path: str | Path, **options: Any) -> Any:
        from msrnn.bst.lm import load_bst

        return load_bst(path, **options)

    def load_trainable(self, path: Path) -> Any:
        """A saved BST model as a trainable causal LM."""
        from msrnn.models.loading import load_hf_causal_lm

        return load_hf_causal_lm(path)
