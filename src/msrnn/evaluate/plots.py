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


def plot_needle_heatmap(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """The standard needle picture for one task: length (x) by needle depth (y), one panel for exact match and one
    for rank accuracy (the true answer ranked first among the candidates), green = found; where the family keeps
    tokens (KV eviction), a third for needle retention (the answer's tokens still held when the question is read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows if r["depth"] is not None}) or [None]
    panels = [("exact", "exact match"), ("rank_acc", "rank accuracy")]
    if any(r.get("retention") is not None for r in rows):
        panels.append(("retention", "needle tokens kept"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.45 * len(depths) + 2.6), dpi=120)
    for ax, (key, label) in zip(axes, panels, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)  # [depth, length]
        for r in rows:
            grid[depths.index(r["depth"]), lengths.index(r["length"])] = 100 * r[key]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), ["-" if d is None else f"{100 * d:.0f}%" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        chance = rows[0]["chance"] if key == "rank_acc" else None
        ax.set_title(label + (f" (chance {100 * chance:.0f}%)" if chance else ""), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title or rows[0]["task"])
    fig.tight_layout()
    return save_figure(fig, out)


def plot_longctx_vs_length(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """One line per task: rank accuracy (solid) and exact match (dashed) against length, averaged over depths."""
    fig, ax = _axes()
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in mine})
        for key, style in (("rank_acc", "-"), ("exact", "--")):
            ys = [100 * np.mean([r[key] for r in mine if r["length"] == n]) for n in lengths]
            ax.plot(lengths, ys, style, marker="o", ms=3, label=f"{task} ({'rank' if key == 'rank_acc' else 'exact'})")
    ax.axhline(100 * rows[0]["chance"], color="grey", ls=":", lw=1, label="rank chance")
    ax.set_ylim(0, 102)
    return _finish(fig, ax, out, "context length (tokens)", "accuracy (%)", title or "Long-context probes")
