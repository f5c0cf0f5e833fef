"""The ``msrnn compare`` report: markdown tables and PNG plots from ``results.json``'s entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from msrnn.families import FAMILIES
from msrnn.io import atomic_file


def _spec(e: dict[str, Any]) -> Any:
    return FAMILIES.get(e["family"])


def _reference(e: dict[str, Any]) -> bool:
    """The comparison's unbounded reference: the entry named by the reference family's cost label (``full``)."""
    return _spec(e).reference and e["family"] == _spec(e).cost_label


def _tuned(e: dict[str, Any]) -> bool:
    """Fine-tuned on the task by ``compare --task-steps`` (named ``<entry>+<task>``)."""
    return "+" in e["name"]


def _series(entries: list[dict[str, Any]], tuned: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Entries that form a line across budgets: each KV policy, and each built family (task-tuned copies
    apart)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        if _tuned(e) != tuned:
            continue
        series = _spec(e).series(e)
        if series is not None:
            out.setdefault(series, []).append(e)
    return out


def _plot_ppl_vs_state(entries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    from msrnn.io import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for label, series in _series(entries).items():
        pts = sorted((e["state_bytes"], e["ppl"]) for e in series)
        applied = series[0].get("policy") is not None  # a policy applied at many budgets: a thin line
        style = {"lw": 1, "ms": 3, "marker": "o"} if applied else \
            {"lw": 2, "ms": 7, "marker": _spec(series[0]).marker}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    for e in entries:
        if _spec(e).series(e) is None and not _tuned(e):
            ax.scatter(max(e["state_bytes"], 1), e["ppl"], marker=_spec(e).marker, s=60, zorder=3,
                       label=e["name"], color="black" if _reference(e) else None)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("state bytes per sequence (largest held at any offset)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity versus state size (same documents)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def _shown(e: dict[str, Any]) -> bool:
    """Entries drawn in the per-position and speed plots (all KV policies would crowd them: TOVA stands in)."""
    return _spec(e).shown(e)


def _plot_position(entries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    from msrnn.io import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for e in filter(_shown, entries):
        pts = e["ppl_by_position"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=e["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    save_figure(fig, path)


def _plot_speed_memory(entries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    from msrnn.io import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for e in filter(_shown, entries):
        pts = e["profile"]
        axes[0].plot([p["tokens"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o", ms=3, label=e["name"])
        axes[1].plot([p["tokens"] for p in pts], [max(p["state_bytes"], 1) for p in pts], marker="o", ms=3,
                     label=e["name"])
    for ax, ylabel in zip(axes, ("tokens/s (chunked streaming)", "state bytes between chunks"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens streamed")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_yscale("log", base=2)
    axes[1].legend(fontsize=6)
    save_figure(fig, path)


def _ppl(e: dict[str, Any]) -> str:
    return f"{e['ppl']:.2f}"


def _longctx(e: dict[str, Any]) -> str:
    """Long-context probes over every task, length and depth: rank accuracy / exact match."""
    rows = e.get("longctx") or []
    if not rows:
        return "n/a"
    return (f"{sum(r['rank_acc'] for r in rows) / len(rows):.2f} / "
            f"{sum(r['exact'] for r in rows) / len(rows):.2f}")


def _accuracy(e: dict[str, Any]) -> str:
    return " / ".join(f"{r['accuracy']:.2f}" for r in e.get("task") or []) or "n/a"


def equal_bytes_table(entries: list[dict[str, Any]], tuned: bool = False, cell=_ppl) -> list[str]:
    """Markdown: one row per budget, one column per KV policy and built family, and one per model given with
    ``--models`` (a single point, in the row of the bytes it holds, where the KV policies were sized to it)."""
    series = _series(entries, tuned)
    for e in entries:
        if _tuned(e) == tuned and _spec(e).series(e) is None and e.get("budget_bytes") and not _reference(e):
            series.setdefault(e["name"], []).append(e)
    budgets = sorted({e["budget_bytes"] for s in series.values() for e in s})
    if not budgets:
        return []
    cols = list(series)
    lines = ["| budget (bytes) | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for b in budgets:
        cells = []
        for c in cols:
            hit = [e for e in series[c] if e["budget_bytes"] == b]
            cells.append(cell(hit[0]) if hit else "n/a")
        lines.append(f"| {b:,} | " + " | ".join(cells) + " |")
    return lines


def write_report(report: dict[str, Any], out: Path) -> None:
    """The report folder: markdown tables, PNGs and results.json."""
    import matplotlib

    matplotlib.use("Agg")
    from msrnn.evaluate.plots import plot_accuracy_vs_segments

    cfg, entries = report["config"], report["entries"]
    _plot_ppl_vs_state(entries, out / "ppl_vs_state.png")
    _plot_position(entries, out / "ppl_vs_position.png")
    _plot_speed_memory(entries, out / "speed_memory_vs_length.png")
    tasks = {e["name"]: e["task"] for e in entries if e.get("task")}
    if tasks:
        # Zero-shot entries sit at chance; when some entries were trained on the task, the plot shows those.
        trained = {e["name"]: e["task"] for e in entries if e.get("task") and e.get("task_trained")}
        chance = next(e["task_chance"] for e in entries if e.get("task"))
        plot_accuracy_vs_segments(trained or tasks, out / "accuracy_vs_length.png", chance=chance,
                                  title=f"{cfg['task']}" + (" (models trained on it)" if trained else " (zero-shot)"))
    lines = ["# msrnn compare", "", f"Documents: `{cfg['data']}` ({cfg['documents']}), first {cfg['max_tokens']} "
             f"tokens of up to {cfg['max_docs']} documents, chunk {cfg['chunk_size']}."]
    if cfg.get("build"):
        lines += ["", f"Built from `{Path(cfg['base']).name}` at each budget: {', '.join(cfg['build'])}, "
                  f"{cfg['build_tokens']:,} training tokens each (same data, same start)."]
    table = equal_bytes_table(entries)
    if table:
        lines += ["", "## Perplexity at equal state bytes", ""] + table
    lines += ["", "## Every entry", "", "| entry | family | size | state bytes | ppl | tokens/s |",
              "|---|---|---|---:|---:|---:|"]
    for e in sorted(entries, key=lambda e: (e["state_bytes"], e["ppl"])):
        size = ", ".join(f"{k}={v}" for k, v in (e.get("sizing") or {}).items()) or \
            (f"slots={e['slots']}" if e.get("slots") else "")
        lines.append(f"| {e['name']} | {e['family']} | {size} | {e['state_bytes']:,} | {e['ppl']:.2f} | "
                     f"{e['tokens_per_s']:,.0f} |")
    if tasks:
        segs = cfg["task_segments"]
        chance = next(e["task_chance"] for e in entries if e.get("task"))
        lines += ["", f"## {cfg['task']} accuracy by length (segments of {cfg['segment_length']} tokens)", "",
                  f"Chance is {chance:.2f}. Entries marked * were not trained on the task (zero-shot).", "",
                  "| entry | " + " | ".join(str(s) for s in segs) + " |", "|---|" + "---:|" * len(segs)]
        for e in entries:
            if e.get("task"):
                mark = "" if e.get("task_trained") else " *"
                lines.append(f"| {e['name']}{mark} | " + " | ".join(f"{r['accuracy']:.2f}" for r in e["task"]) + " |")
    tuned = equal_bytes_table(entries, tuned=True, cell=_accuracy)
    if tuned:
        segs = " / ".join(str(n) for n in cfg["task_segments"])
        lines += ["", f"## {cfg['task']} accuracy at equal state bytes, after {cfg['task_steps']} fine-tuning steps",
                  "", f"Every model (the base model for KV) fine-tuned on the same samples; accuracy at {segs} "
                  "segments."] + [""] + tuned
    probed = [e for e in entries if e.get("longctx")]
    if probed:
        lengths = sorted({r["length"] for r in probed[0]["longctx"]})
        chance = probed[0]["longctx"][0]["chance"]
        lines += ["", f"## Long-context probes ({', '.join(cfg['longctx'])}; {cfg['longctx_samples']} samples per "
                  f"length and depth, depths {', '.join(str(d) for d in cfg['longctx_depths'])})", "",
                  f"Rank accuracy (the true answer ranked first of the candidates; chance {chance:.2f}) / exact match "
                  "of the greedy answer, over tasks and depths; needle kept: the share of the answer's tokens a KV "
                  "cache still holds when the question is read.", "",
                  "| entry | " + " | ".join(f"{n} tokens" for n in lengths) + " | needle kept |",
                  "|---|" + "---:|" * (len(lengths) + 1)]
        for e in probed:
            cells = []
            for n in lengths:
                cells.append(_longctx({"longctx": [r for r in e["longctx"] if r["length"] == n]}))
            kept = [r["retention"] for r in e["longctx"] if r["retention"] is not None]
            cells.append(f"{sum(kept) / len(kept):.2f}" if kept else "-")
            lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
        table = equal_bytes_table(entries, cell=_longctx)
        if table:
            lines += ["", "### Long-context probes at equal state bytes (rank accuracy / exact match)", ""] + table
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "Plots: `ppl_vs_state.png`, `ppl_vs_position.png`, `speed_memory_vs_length.png`"
              + (", `accuracy_vs_length.png`" if tasks else "") + "; raw numbers: `results.json`."]
    with atomic_file(out / "report.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
