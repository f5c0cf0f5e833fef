"""Analytic forward FLOPs and state bytes versus stream length, for every family, from one model config.

Counts matmul FLOPs (2 per multiply-add) of a Llama-style decoder processing a stream of L tokens, and the bytes
of state it carries at the end. Each family's spec (``msrnn.families``) owns its formula and its typed knobs:

* ``full``  -- softmax attention with the whole KV cache: attention FLOPs grow as L^2, state as L;
* ``kv``    -- KV eviction at ``budget`` slots per layer (a policy that scores from attention adds one row per token);
* ``supra`` -- linear attention: phi maps plus a [H, F, d] fp32 state per layer (constant; F = feature_dim,
               default d);
* ``bst``   -- Block-State Transformer: FFT SSM over the stream + attention inside blocks of ``block_size`` tokens
               and to ``block_size`` context states; state = SSM states + the current block's keys/values;
* ``rmt``   -- Recurrent Memory Transformer: full attention inside segments of ``segment_length`` tokens plus
               2 * ``num_memory_tokens`` memory slots; state = the memory vectors.

These are models, not measurements: tests tie the state-byte formulas to the bytes the implementations really hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from msrnn.errors import ConfigError
from msrnn.families import FAMILIES as SPECS
from msrnn.families import Knobs, cost_families

FAMILIES = cost_families()  # the families' cost-table names (the full cache is "full")


@dataclass(frozen=True)
class Arch:
    """The shape of a Llama-style decoder, all the cost model needs."""

    layers: int
    d: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    bytes_per_value: int = 4  # fp32 weights/activations on CPU

    @classmethod
    def from_config(cls, cfg: Any, bytes_per_value: int = 4) -> Arch:
        """The shape of a transformers config (``head_dim`` when it sets one)."""
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                   getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), hd, cfg.intermediate_size,
                   cfg.vocab_size, bytes_per_value)

    def dense_flops_per_token(self) -> float:
        """Projections, MLP and LM head (independent of context length)."""
        q_o = 2 * 2 * self.d * self.heads * self.head_dim
        kv = 2 * 2 * self.d * self.kv_heads * self.head_dim
        mlp = 2 * 3 * self.d * self.ffn
        return self.layers * (q_o + kv + mlp) + 2 * self.d * self.vocab

    def kv_bytes_per_slot(self) -> int:
        """Bytes of one token's keys and values over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value


def costs(arch: Arch, family: str, length: int, knobs: Knobs | None = None, **values: Any) -> dict[str, float]:
    """{"flops": forward FLOPs for the whole stream, "state_bytes": state held after it}, for ``family`` (its
    cost-table name) at ``knobs``, or at its knobs made from ``values`` (e.g. ``budget=256`` for kv); a knob that
    is not the family's is refused."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if length < 1:
        raise ConfigError("length must be >= 1")
    spec = SPECS.get(family)
    if knobs is None:
        knobs = spec.knobs(**values)
    elif values:
        raise ConfigError("give the family's knobs or knob values, not both")
    return spec.cost(arch, length, knobs)


def cost_table(arch: Arch, lengths: list[int], **values: Any) -> list[dict[str, Any]]:
    """Cost rows for every family at every length; each knob value goes to the families that have that knob
    (``budget`` to kv, ``block_size`` to bst, ...), and one that no family has is refused."""
    specs = SPECS.values()
    unknown = sorted(k for k in values if not any(k in s.knob_names() for s in specs))
    if unknown:
        raise ConfigError(f"no family has a knob {', '.join(unknown)}")
    knobs = {s.cost_label: s.knobs(**{k: v for k, v in values.items() if k in s.knob_names()}) for s in specs}
    return [{"family": fam, "length": L, **costs(arch, fam, L, knobs[fam])} for L in lengths for fam in FAMILIES]


def plot_costs(rows: list[dict[str, Any]], out: str) -> str:
    """Two panels (FLOPs, state bytes) versus length, one line per family, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msrnn.io import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for fam in FAMILIES:
        pts = sorted((r["length"], r["flops"], r["state_bytes"]) for r in rows if r["family"] == fam)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=fam)
    for ax, ylabel in zip(axes, ("forward FLOPs (whole stream)", "state bytes per sequence"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("stream length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("analytic cost model (msrnn.bench.costs)")
    return str(save_figure(fig, out))
