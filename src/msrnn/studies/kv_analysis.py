"""Which tokens a bounded cache keeps, like the TOVA paper's analysis (Oren et al., 2024, Figs. 7-9).

:func:`trace_retention` streams one document token by token and records, after every step and for every layer,
which original positions are still held. From that trace:

* a heatmap per layer (step x position),
* how long the first tokens survive (TOVA keeps the first token although no rule protects it),
* which kinds of tokens are kept more than their base rate (for code: newlines, indentation, punctuation,
  identifiers/keywords, numbers, strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msrnn.io import save_figure
from msrnn.kv.lm import KVEvictionLM
from msrnn.protocol import split, stream_chunks

KINDS = ("newline", "indent", "punct", "word", "number", "other")


def token_kind(text: str) -> str:
    """Coarse kind of a decoded token, for code."""
    if "\n" in text:
        return "newline"
    if text and text.isspace():
        return "indent"
    core = text.strip()
    if core.isdigit():
        return "number"
    if core and all(not ch.isalnum() and ch != "_" for ch in core):
        return "punct"
    if core and (core.replace("_", "a").isalnum()):
        return "word"
    return "other"


@dataclass
class RetentionTrace:
    """Which positions each layer keeps after each token (TOVA Figs. 7-9)."""

    kept: np.ndarray  # [L, T, T] float: share of groups (KV heads or 1) holding position p after step t
    budget: int
    ids: np.ndarray  # [T]

    def first_token_survival(self, first: int = 4) -> list[dict[str, Any]]:
        """Per layer: for each of the first positions, the share of post-budget steps it was still kept."""
        L, T, _ = self.kept.shape
        start = min(self.budget, T - 1)
        out = []
        for layer in range(L):
            row = {"layer": layer}
            for p in range(min(first, T)):
                row[f"pos{p}"] = float(self.kept[layer, start:, p].mean()) if start < T else float("nan")
            out.append(row)
        return out

    def kind_enrichment(self, kinds: list[str]) -> list[dict[str, Any]]:
        """Share of kept slots by token kind versus the kind's share among tokens seen (ratio > 1 = favoured)."""
        L, T, _ = self.kept.shape
        start = min(self.budget, T - 1)
        kinds_arr = np.array(kinds)
        rows = []
        for kind in KINDS:
            is_k = kinds_arr == kind
            if not is_k.any():
                continue
            base, kept_share = [], []
            for t in range(start, T):
                seen = is_k[: t + 1]
                base.append(seen.mean())
                held = self.kept[:, t, : t + 1]  # [L, t+1]
                kept_share.append((held * seen).sum() / max(held.sum(), 1e-9))
            b, k = float(np.mean(base)), float(np.mean(kept_share))
            rows.append({"kind": kind, "base_rate": b, "kept_share": k, "ratio": k / b if b else float("nan")})
        return rows


@torch.inference_mode()
def trace_retention(lm: KVEvictionLM, ids: np.ndarray | list[int]) -> RetentionTrace:
    """Feed ``ids`` token by token and record every layer's kept positions."""
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    L = lm.model.config.num_hidden_layers
    kept = np.zeros((L, T, T), dtype=np.float32)
    for step in stream_chunks(lm, split(torch.from_numpy(ids)[None], 1)):  # token by token
        t = step.start
        for li, layer in enumerate(step.state.cache.layers):
            pos = layer.kept_positions()[0]  # [G, S]
            G = pos.shape[0]
            for g in range(G):
                p = pos[g][pos[g] >= 0].cpu().numpy()
                kept[li, t, p] += 1.0 / G
    return RetentionTrace(kept=kept, budget=lm.policy.budget or T, ids=ids)


def plot_retention(trace: RetentionTrace, out: str | Path, title: str = "") -> Path:
    """One heatmap per layer: black = position held after that step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = trace.kept.shape[0]
    cols = min(L, 4)
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), dpi=110, squeeze=False)
    for li in range(rows * cols):
        ax = axes[li // cols][li % cols]
        if li >= L:
            ax.axis("off")
            continue
        ax.imshow(trace.kept[li], cmap="Greys", aspect="auto", interpolation="nearest", origin="upper", vmin=0,
                  vmax=1)
        ax.set_title(f"layer {li}", fontsize=9)
        ax.set_xlabel("token position", fontsize=8)
        ax.set_ylabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "kept positions over time", fontsize=10)
    return save_figure(fig, out)
