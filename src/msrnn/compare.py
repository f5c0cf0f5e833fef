"""One comparison of the four ways to bound a transformer's state, at equal state bytes.

Entries:
* ``full``: the base model with its whole KV cache (the unbounded reference);
* ``kv:<policy>@<bytes>``: KV eviction on the base model with as many slots as fit in each budget;
* each trained bounded model (SUPRA, BST, RMT directories): evaluated at the state its architecture holds,
  and every KV policy is also run at *that* many bytes, so each family meets eviction at its own size.
  Resizing a trained SUPRA/BST/RMT model to an arbitrary budget would need retraining, which this command
  does not do; train models of other sizes with ``msrnn train ...`` and pass them too.

Every entry reads the same held-out documents with the streaming evaluator (and, optionally, the same memory-task
samples). Results are written one JSON file per entry as soon as it finishes, keyed by a hash of the settings,
so an interrupted run resumes where it stopped; the report (markdown, PNGs, ``results.json``) is rebuilt from
those files at the end.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msrnn.errors import ConfigError, DataError
from msrnn.io import atomic_file, write_json

SCHEMA_VERSION = 1


@dataclass
class CompareConfig:
    base: str
    models: list[str] = field(default_factory=list)  # trained SUPRA / BST / RMT directories
    budgets: list[int] = field(default_factory=list)  # state bytes per sequence for the KV policies
    policies: list[str] = field(default_factory=lambda: ["window", "sink", "h2o", "tova"])
    data: str = "stdlib:test"
    documents: str = "folder"
    max_tokens: int = 2048
    max_docs: int = 6
    chunk_size: int = 128
    task: str | None = None
    task_segments: list[int] = field(default_factory=lambda: [1, 4, 16])
    segment_length: int = 128
    task_samples: int = 50
    profile_tokens: int = 8192  # tokens/s and state bytes versus length, from one long random stream per entry
    probe_tokens: int = 2048  # stream length for the largest-state probe (>= 7 x the longest block/segment)

    def __post_init__(self) -> None:
        if any(b < 1 for b in self.budgets):
            raise ConfigError("state budgets must be positive byte counts, e.g. --budgets 65536,262144")
        if not self.policies:
            raise ConfigError("give at least one KV policy, e.g. --policies tova,window")
        from msrnn.kv import KV_POLICIES

        for p in self.policies:
            KV_POLICIES.get(p)
        if self.task is not None:
            from msrnn.tasks import TASKS

            TASKS.get(self.task)

    def folder_name(self) -> str:
        """The report folder's name: the base model plus a hash of every setting, so two configs never share
        (or overwrite) a folder and rerunning one config resumes it."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"compare-{Path(self.base).name}-{digest}"

    def eval_key(self) -> str:
        """What an entry's results depend on besides the entry itself (changing any of it re-runs entries)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("base", "models", "budgets", "policies")}
        return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Entry:
    name: str
    family: str
    model: str
    policy: str | None = None
    slots: int | None = None
    budget_bytes: int | None = None


def _tokenizer_id(tok: Any) -> str:
    return hashlib.sha1(json.dumps(tok.get_vocab(), sort_keys=True).encode()).hexdigest()[:12]


def plan(cfg: CompareConfig) -> list[Entry]:
    """The entries to evaluate: the full cache, KV policies at each budget and at each bounded model's bytes,
    and the bounded models themselves."""
    from msrnn.bench.costs import Arch
    from msrnn.models import load_lm

    base = load_lm(cfg.base)
    per_slot = Arch.from_config(base.model.config).kv_bytes_per_slot()
    entries = [Entry("full", "full", cfg.base)]
    budgets = {b: f"{b}" for b in cfg.budgets}
    for path in cfg.models:
        lm = load_lm(path)
        if _tokenizer_id(lm.tokenizer) != _tokenizer_id(base.tokenizer):
            raise DataError(f"{path} uses a different tokenizer from {cfg.base}; perplexities would not be "
                            "comparable (train every model with the base model's tokenizer)")
        nbytes = measure_state_bytes(lm, cfg.probe_tokens)
        from msrnn.models.loading import family_of

        family = family_of(path)
        entries.append(Entry(f"{family}:{Path(path).name}", family, str(path), budget_bytes=nbytes))
        budgets.setdefault(nbytes, f"{nbytes}")
    for b in sorted(budgets):
        for p in cfg.policies:
            slots = fit_slots(base, p, b, per_slot)
            if slots < 8:
                continue  # fewer than 8 slots per layer is not a meaningful cache
            entries.append(Entry(f"kv:{p}@{b}", "kv", cfg.base, policy=p, slots=slots, budget_bytes=b))
    return entries


def fit_slots(base: Any, policy: str, budget: int, per_slot: int) -> int:
    """The most KV slots whose measured state (keys, values and the policy's bookkeeping) fits ``budget``."""
    from msrnn.kv import make_policy, wrap

    slots = budget // per_slot
    while slots >= 8 and measure_state_bytes(wrap(base, make_policy(policy, slots), prefill="oneshot"),
                                             tokens=4 * slots + 64, chunk=7) > budget:
        slots -= 1
    return int(slots)


def measure_state_bytes(lm: Any, tokens: int = 2048, chunk: int = 7) -> int:
    """Peak state bytes of one sequence over a random stream: the bound a family really needs.

    The chunk is odd so chunk ends fall at every offset inside a block or segment (a model that drops its
    block keys at each block end looks smaller if it is only measured at block ends)."""
    import torch

    state, peak = lm.init_state(1), 0
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(0, tokens, chunk):
            _, state = lm.forward_chunk(torch.randint(0, lm.vocab_size, (1, chunk), generator=g), state)
            peak = max(peak, lm.state_nbytes(state))
    return peak


def _load(entry: Entry) -> Any:
    from msrnn.models import load_lm

    lm = load_lm(entry.model)
    if entry.family == "kv":
        from msrnn.kv import make_policy, wrap

        lm = wrap(lm, make_policy(entry.policy, entry.slots), prefill="oneshot")
    return lm


def run_entry(entry: Entry, cfg: CompareConfig, progress: bool = False) -> dict[str, Any]:
    from msrnn.evaluate import StreamEvalConfig, evaluate_stream
    from msrnn.evaluate.documents import eval_documents
    from msrnn.evaluate.plots import log_buckets

    lm = _load(entry)
    docs = eval_documents(cfg.data, lm.tokenizer, unit=cfg.documents, max_documents=cfg.max_docs,
                          min_tokens=cfg.max_tokens, max_tokens=cfg.max_tokens)
    res = evaluate_stream(lm, [d.ids for d in docs],
                          StreamEvalConfig(chunk_size=cfg.chunk_size, max_tokens=cfg.max_tokens), progress=progress)
    xs, ys = log_buckets(res)
    out: dict[str, Any] = {**asdict(entry), "ppl": res.ppl, "tokens": res.tokens, "documents": res.documents,
                           "state_bytes": max(res.peak_state_bytes, measure_state_bytes(lm, cfg.probe_tokens)),
                           "eval_peak_state_bytes": res.peak_state_bytes, "tokens_per_s": res.tokens_per_s,
                           "nonfinite": res.nonfinite, "ppl_by_position": [[float(x), float(y)]
                                                                         for x, y in zip(xs, ys, strict=True)]}
    from msrnn.bench.stream import stream_bench

    chunk = min(cfg.chunk_size, cfg.profile_tokens)
    prof = stream_bench(lm, cfg.profile_tokens, chunk=chunk, samples=8)
    out["profile"] = [{"tokens": r["tokens"], "state_bytes": r["state_bytes"], "rss_mib": r["rss_mib"],
                       "tokens_per_s": chunk / max(r["ms_per_chunk"] / 1e3, 1e-9)} for r in prof["rows"]]
    trained_task = getattr(getattr(getattr(lm, "wrapper", None), "config", None), "task", None)
    if cfg.task and trained_task == cfg.task:
        from msrnn.evaluate.tasks import TaskEvalConfig, evaluate_task
        from msrnn.tasks import TaskGenerator, noise_sentences

        gen = TaskGenerator(cfg.task, lm.tokenizer, noise_sentences("stdlib", "test"))
        rows = evaluate_task(lm, gen, [n * cfg.segment_length for n in cfg.task_segments],
                             TaskEvalConfig(samples=cfg.task_samples, chunk_size=cfg.segment_length))
        out["task"] = [{"segments": n, **r} for n, r in zip(cfg.task_segments, rows, strict=True)]
    return out


def _entry_file(out: Path, entry: Entry) -> Path:
    return out / "entries" / (entry.name.replace(":", "_").replace("@", "_at_").replace("/", "_") + ".json")


def compare(cfg: CompareConfig, root: str | Path, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Evaluate every planned entry into ``root/<cfg.folder_name()>`` (skipping entries already done there) and
    write the report; returns it with ``folder`` set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from msrnn.ui import err_console

    out = Path(root) / cfg.folder_name()
    plan_file = out / "plan.json"
    if resume and plan_file.exists():  # the plan measures every model and fits every slot count: do it once
        entries = [Entry(**e) for e in json.loads(plan_file.read_text())]
    else:
        entries = plan(cfg)
        write_json(plan_file, [asdict(e) for e in entries])
    key = cfg.eval_key()
    results = []
    with Progress(TextColumn("[bold]compare {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress, console=err_console) as bar:
        job = bar.add_task("", total=len(entries))
        for entry in entries:
            bar.update(job, description=entry.name)
            path = _entry_file(out, entry)
            if resume and path.exists():
                saved = json.loads(path.read_text())
                if saved.get("eval_key") == key:
                    results.append({**saved, "resumed": True})
                    bar.advance(job)
                    continue
            res = {**run_entry(entry, cfg), "eval_key": key}
            write_json(path, res)
            results.append({**res, "resumed": False})
            bar.advance(job)
    report = {"schema": SCHEMA_VERSION, "folder": str(out), "config": asdict(cfg), "entries": results}
    write_json(out / "results.json", report)
    write_report(report, out)
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msrnn.evaluate.plots import plot_accuracy_vs_segments, save_figure

    entries = report["entries"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for policy in report["config"]["policies"]:  # one line per KV policy across budgets
        pts = sorted((e["state_bytes"], e["ppl"]) for e in entries if e["family"] == "kv" and e["policy"] == policy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=f"kv {policy}")
    markers = {"full": "*", "supra": "s", "bst": "D", "rmt": "^", "hf": "x"}
    for e in entries:
        if e["family"] != "kv":
            ax.scatter(max(e["state_bytes"], 1), e["ppl"], marker=markers.get(e["family"], "x"), s=60, zorder=3,
                       label=e["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("state bytes per sequence (largest held at any offset)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity versus state size (same documents)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, out / "ppl_vs_state.png")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for e in entries:
        if e["family"] != "kv" or e["policy"] == "tova":
            pts = e["ppl_by_position"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=e["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    save_figure(fig, out / "ppl_vs_position.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for e in entries:
        if e["family"] != "kv" or e["policy"] == "tova":
            pts = e["profile"]
            axes[0].plot([p["tokens"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o", ms=3,
                         label=e["name"])
            axes[1].plot([p["tokens"] for p in pts], [max(p["state_bytes"], 1) for p in pts], marker="o", ms=3,
                         label=e["name"])
    for ax, ylabel in zip(axes, ("tokens/s (chunked streaming)", "state bytes between chunks"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens streamed")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_yscale("log", base=2)
    axes[1].legend(fontsize=6)
    save_figure(fig, out / "speed_memory_vs_length.png")
    tasks = {e["name"]: e["task"] for e in entries if e.get("task")}
    if tasks:
        plot_accuracy_vs_segments(tasks, out / "accuracy_vs_length.png", title=report["config"]["task"])
    lines = ["# msrnn compare", "", f"Documents: `{report['config']['data']}` ({report['config']['documents']}), "
             f"first {report['config']['max_tokens']} tokens of up to {report['config']['max_docs']} documents, "
             f"chunk {report['config']['chunk_size']}.", "",
             "| entry | family | state bytes | ppl | tokens/s |", "|---|---|---:|---:|---:|"]
    for e in sorted(entries, key=lambda e: (e["state_bytes"], e["ppl"])):
        lines.append(f"| {e['name']} | {e['family']} | {e['state_bytes']:,} | {e['ppl']:.2f} | "
                     f"{e['tokens_per_s']:,.0f} |")
    if tasks:
        segs = report["config"]["task_segments"]
        lines += ["", f"## {report['config']['task']} accuracy by length (segments)", "",
                  "| entry | " + " | ".join(str(s) for s in segs) + " |", "|---|" + "---:|" * len(segs)]
        for name, rows in tasks.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['accuracy']:.2f}" for r in rows) + " |")
    lines += ["", "Plots: `ppl_vs_state.png`, `ppl_vs_position.png`, `speed_memory_vs_length.png`"
              + (", `accuracy_vs_length.png`" if tasks else "") + "; raw numbers: `results.json`."]
    with atomic_file(out / "report.md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
