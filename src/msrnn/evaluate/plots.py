"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msrnn.io import save_figure


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2), dpi=120)


def _finish(fig, ax, out: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Log-2 x axis, labels, grid and legend, then write the PNG."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, out)


def plot_ppl_vs_position(curves: dict[str, tuple[np.ndarray, np.ndarray]], out: str | Path, title: str = "") -> Path:
    """One line per label: perplexity against token position (log x)."""
    fig, ax = _axes()
    for label, (pos, ppl) in curves.items():
        ax.plot(pos, ppl, marker="o", ms=3, lw=1.5, label=label)
    ax.set_yscale("log")
    return _finish(fig, ax, out, "token position in document", "perplexity", title or "Perplexity versus position")


def log_buckets(result, min_edge: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(bucket centre, ppl) over power-of-two buckets: a smooth curve for a log-x plot."""
    count, nll = result.count_by_pos, result.nll_sum_by_pos
    edges = [1]
    e = min_edge
    while e < len(count):
        edges.append(e)
        e *= 2
    edges.append(len(count))
    xs, ys = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=False):
        c = count[lo:hi].sum()
        if c:
            xs.append(np.sqrt(lo * hi))
            ys.append(float(np.exp(nll[lo:hi].sum() / c)))
    return np.array(xs), np.array(ys)


def plot_accuracy_vs_segments(curves: dict[str, list[dict]], out: str | Path, title: str = "",
                              chance: float | None = None) -> Path:
    """One line per label: task accuracy against input length in segments (log x), as the RMT report's Fig. 5."""
    fig, ax = _axes()
    for label, rows in curves.items():
        ax.plot([r["segments"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o", ms=4, label=label)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 102)
    return _finish(fig, ax, out, "input length (segments)", "accuracy (%)", title or "Accuracy versus length")
