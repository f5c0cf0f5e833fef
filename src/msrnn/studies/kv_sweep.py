"""Perplexity versus multi-state size for several policies: the TOVA paper's Figure 3 protocol at our scale.

Every document is cut to ``context`` tokens and streamed with exact (token-by-token equivalent) eviction.
Budgets are fractions of the context (1/16 .. 1/2 by default), so "TOVA at 1/8" means what it means in the
paper. Two tasks:

* ``plain`` -- held-out text; perplexity over all positions.
* ``copy``  -- a held-out window of ``context / 2`` tokens followed by itself; perplexity of the copy only.
  Distant tokens decide every prediction here, which is where attention-based policies should shine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from msrnn.errors import ConfigError, DataError
from msrnn.evaluate import StreamEvalConfig, evaluate_stream
from msrnn.evaluate.streaming import exp_nll
from msrnn.kv.settings import KVSettings, apply_kv, parse_policy_spec

TASKS = ("plain", "copy")


def parse_fractions(text: str) -> list[Fraction]:
    """``1/16,1/8`` -> fractions in (0, 1]."""
    try:
        out = [Fraction(x) for x in text.split(",") if x.strip()]
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"bad fractions {text!r}; write e.g. 1/16,1/8,1/4,1/2") from None
    if not out or any(not 0 < f <= 1 for f in out):
        raise ConfigError("fractions must be in (0, 1]")
    return out


@dataclass
class SweepConfig:
    """The sweep: context, budget fractions, policies, tasks and chunk size."""

    context: int = 512
    fractions: list[Fraction] = field(default_factory=lambda: [Fraction(1, 16), Fraction(1, 8), Fraction(1, 4),
                                                                Fraction(1, 2)])
    policies: list[str] = field(default_factory=lambda: ["window", "sink", "h2o", "tova"])
    tasks: list[str] = field(default_factory=lambda: ["plain", "copy"])
    chunk_size: int = 64
    max_documents: int = 16

    def __post_init__(self) -> None:
        if self.context < 16:
            raise ConfigError("context must be >= 16 tokens")
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"unknown task {t!r}; use plain or copy")
        for p in self.policies:
            name, opts = parse_policy_spec(p)
            if name == "full":  # always the reference row: as a swept policy its rows would be labelled with budgets
                raise ConfigError("the full cache is always the sweep's reference row; drop 'full' from --policies")
            for frac in self.fractions:  # every option value, at every budget, before any evaluation runs
                budget = max(1, int(self.context * frac))
                if not (name == "sink" and opts.get("sinks", 4) >= budget):  # skipped by the sweep, as below
                    KVSettings(name, budget, **opts)


def task_documents(docs: list[np.ndarray], task: str, context: int, max_documents: int) -> tuple[list[np.ndarray], int]:
    """(documents, first scored position) for a task."""
    if task == "plain":
        out = [d[:context] for d in docs if len(d) >= context][:max_documents]
        first = 1
    else:
        half = context // 2
        out = [np.concatenate([d[:half], d[:half]]) for d in docs if len(d) >= half][:max_documents]
        first = half
    if not out:
        raise DataError(f"no held-out document has {context} tokens; lower --context or use longer data")
    return out, first


def _ppl_from(res, first: int) -> float:
    s, c = res.nll_sum_by_pos[first:], res.count_by_pos[first:]
    return exp_nll(float(s.sum() / c.sum()))


def run_sweep(lm, docs: list[np.ndarray], cfg: SweepConfig, progress: Any = None) -> dict[str, Any]:
    """Evaluate the full cache and every policy x budget on every task; returns rows ready for a table."""
    rows = []
    ecfg = StreamEvalConfig(chunk_size=cfg.chunk_size, max_tokens=None)
    for task in cfg.tasks:
        tdocs, first = task_documents(docs, task, cfg.context, cfg.max_documents)
        full = evaluate_stream(lm, tdocs, ecfg)
        rows.append({"task": task, "policy": "full", "fraction": 1.0, "budget": cfg.context,
                     "ppl": _ppl_from(full, first), "peak_state_bytes": full.peak_state_bytes,
                     "documents": len(tdocs)})
        if progress:
            progress(rows[-1])
        for spec in cfg.policies:
            name, opts = parse_policy_spec(spec)
            for frac in cfg.fractions:
                budget = max(1, int(cfg.context * frac))
                if name == "sink" and opts.get("sinks", 4) >= budget:
                    continue
                res = evaluate_stream(apply_kv(lm, KVSettings(name, budget, **opts)), tdocs, ecfg)
                rows.append({"task": task, "policy": spec, "fraction": float(frac), "budget": budget,
                             "ppl": _ppl_from(res, first), "peak_state_bytes": res.peak_state_bytes,
                             "documents": len(tdocs)})
                if progress:
                    progress(rows[-1])
    return {"context": cfg.context, "chunk_size": cfg.chunk_size, "rows": rows}


def plot_sweep(result: dict[str, Any], out_prefix: str) -> list[str]:
    """One PNG per task: perplexity versus multi-state size, the full cache as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msrnn.io import save_figure

    paths = []
    for task in sorted({r["task"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["task"] == task]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for spec in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"):
            pts = sorted((r["budget"], r["ppl"]) for r in rows if r["policy"] == spec)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=spec)
        full = next(r["ppl"] for r in rows if r["policy"] == "full")
        ax.axhline(full, color="k", ls="--", lw=1, label=f"full cache ({full:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"multi-state size (KV slots per layer), context {result['context']}")
        ax.set_ylabel("perplexity" + (" of the repeated half" if task == "copy" else ""))
        ax.set_title(f"KV eviction policies, task: {task}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(str(save_figure(fig, f"{out_prefix}_{task}.png")))
    return paths
