"""One comparison of the four ways to bound a transformer's state, at equal state bytes.

Entries:
* ``full``: the base model with its whole KV cache (the unbounded reference);
* ``kv:<policy>@<bytes>``: KV eviction on the base model with as many slots as fit in each budget;
* ``<family>@<bytes>`` (with ``build``): SUPRA, BST and RMT built from the base model *at each budget*
  (``msrnn.build`` sizes each so its measured peak state fits, and trains each on the same number of tokens);
* each trained model passed in ``models``: evaluated at the state its architecture holds, and every KV policy
  is also run at *that* many bytes, so each family meets eviction at its own size.

Every entry reads the same held-out documents with the streaming evaluator and, with ``task``, answers the same
memory-task samples (models not trained on the task answer zero-shot; the report marks them and gives chance).
Results are written one JSON file per entry as soon as it finishes, keyed by a hash of the settings, so an
interrupted run resumes where it stopped; the report (markdown, PNGs, ``results.json``) is rebuilt from those
files at the end.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msrnn.errors import ConfigError, DataError
from msrnn.io import write_json
from msrnn.protocol import measure_state_bytes
from msrnn.provenance import stamped

SCHEMA_VERSION = 2  # 2: built entries (sizing), notes, zero-shot task marks


@dataclass
class CompareConfig:
    """One comparison: base model, state budgets in bytes, families to build, data and evaluation settings."""
    base: str
    models: list[str] = field(default_factory=list)  # trained SUPRA / BST / RMT directories
    state_bytes: list[int] = field(default_factory=list)  # state budgets: bytes per sequence (KV and builds)
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
    probe_tokens: int = 2048  # stream length for the largest-state probe (>= 2 x the longest block/segment)
    build: list[str] = field(default_factory=list)  # families to build at every budget (msrnn.build)
    build_tokens: int = 262_144  # training tokens per built model, equal for every family and budget
    build_data: str = "stdlib"  # what built models train on (its train split)
    build_seq_len: int = 512
    task_steps: int = 0  # > 0: also fine-tune the base (for KV) and every built model on `task`, equal steps
    longctx: list[str] = field(default_factory=list)  # long-context probes (msrnn.tasks.longctx) to run per entry
    longctx_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    longctx_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    longctx_samples: int = 5
    longctx_data: str = "stdlib"  # the probes' haystack (its test split)

    def __post_init__(self) -> None:
        if any(b < 1 for b in self.state_bytes):
            raise ConfigError("state budgets must be positive byte counts, e.g. --state-bytes 65536,262144")
        if not self.policies:
            raise ConfigError("give at least one KV policy, e.g. --policies tova,window")
        from msrnn.kv import KV_POLICIES

        for p in self.policies:
            KV_POLICIES.get(p)
        if self.task is not None:
            from msrnn.tasks import TASKS

            TASKS.get(self.task)
        probe_settings = {"longctx_lengths": [512, 1024, 2048], "longctx_depths": [0.0, 0.5, 1.0],
                          "longctx_samples": 5, "longctx_data": "stdlib"}  # the defaults above
        given = [k for k, v in probe_settings.items() if getattr(self, k) != v]
        if given and not self.longctx:  # refused, not accepted and ignored
            raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in given)} set the long-context probes; "
                              "name them with --longctx (e.g. --longctx passkey) or drop the option")
        if self.longctx:
            from msrnn.tasks.longctx import LONGCTX_TASKS

            for t in self.longctx:
                LONGCTX_TASKS.get(t)
            if not self.longctx_lengths or min(self.longctx_lengths) < 1 or self.longctx_samples < 1:
                raise ConfigError("long-context lengths and samples must be >= 1")
            if not self.longctx_depths or any(not 0.0 <= d <= 1.0 for d in self.longctx_depths):
                raise ConfigError("long-context depths are fractions in [0, 1], e.g. --longctx-depths 0,0.5,1")
        if self.task_steps < 0:
            raise ConfigError(f"--task-steps must be >= 0, got {self.task_steps}")
        if self.task_steps and (self.task is None or not self.build):
            raise ConfigError("--task-steps fine-tunes built models on --task: give --task and --build too")
        if self.build:
            self.build_config()  # validates the families and the token budget now, not after an hour
            if not self.state_bytes:
                raise ConfigError("--build sizes models to --state-bytes; give at least one, e.g. --state-bytes 262144")

    def build_config(self) -> Any:
        """The build settings this comparison implies."""
        from msrnn.build import BuildConfig

        return BuildConfig(families=tuple(self.build), train_tokens=self.build_tokens, data=self.build_data,
                           seq_len=self.build_seq_len)

    def task_tune_config(self) -> Any:
        """The task fine-tuning settings this comparison implies."""
        from msrnn.train.tasks import TaskTuneConfig

        return TaskTuneConfig(task=self.task, segment_length=self.segment_length, steps=self.task_steps)

    def folder_name(self) -> str:
        """The report folder's name: the base model plus a hash of every setting, so two configs never share
        (or overwrite) a folder and rerunning one config resumes it."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"compare-{Path(self.base).name}-{digest}"

    def eval_key(self) -> str:
        """What an entry's results depend on besides the entry itself (changing any of it re-runs entries)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("base", "models", "state_bytes", "policies")}
        keep["kv_prefill"] = KV_PREFILL  # entries scored under the earlier oneshot protocol re-run
        return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


# KV entries prefill exactly (the token-by-token result): the state holds the fitted slots at every offset, so
# "equal state bytes" holds inside chunks too. oneshot (used before) evicted once per chunk, so a chunk's late
# queries attended up to slots + chunk - 1 slots, more than the budget the entry was fitted to.
KV_PREFILL = "exact"


@dataclass
class Entry:
    """One row of a comparison: a model (or base + KV policy) at a state budget."""
    name: str
    family: str
    model: str
    policy: str | None = None
    slots: int | None = None
    budget_bytes: int | None = None
    state_bytes: int | None = None  # the peak measured when the entry was planned
    sizing: dict[str, int] | None = None  # a built model's size knobs

    def knobs(self) -> Any:
        """The entry's family knobs where its family is applied to the model rather than saved with it (KV: the
        policy at ``slots``, prefilled exactly), else None."""
        from msrnn.families import FAMILIES

        if self.policy is None:
            return None
        return FAMILIES.get(self.family).knobs(policy=self.policy, budget=self.slots, prefill=KV_PREFILL)


def _tokenizer_id(tok: Any) -> str:
    return hashlib.sha1(json.dumps(tok.get_vocab(), sort_keys=True).encode()).hexdigest()[:12]


def plan(cfg: CompareConfig, progress: bool = True) -> tuple[list[Entry], list[str]]:
    """The entries to evaluate (the full cache, KV policies at each budget and at each given model's bytes, the
    given models, and the models built at each budget) and notes on what could not be planned."""
    from msrnn.build import fit
    from msrnn.families import FAMILIES
    from msrnn.models import load_lm
    from msrnn.models.loading import family_of

    base = load_lm(cfg.base)
    full, kv = FAMILIES.get("hf"), FAMILIES.get("kv")
    entries, notes = [Entry(full.cost_label, full.cost_label, cfg.base)], []
    budgets = {b: f"{b}" for b in cfg.state_bytes}

    def add_model(path: str, name: str, budget: int | None = None, sizing: dict[str, int] | None = None) -> int:
        lm = load_lm(path)
        if _tokenizer_id(lm.tokenizer) != _tokenizer_id(base.tokenizer):
            raise DataError(f"{path} uses a different tokenizer from {cfg.base}; perplexities would not be "
                            "comparable (train every model with the base model's tokenizer)")
        nbytes = measure_state_bytes(lm, cfg.probe_tokens)
        family = family_of(path)
        entries.append(Entry(name or f"{family}:{Path(path).name}", family, str(path),
                             budget_bytes=budget or nbytes, state_bytes=nbytes, sizing=sizing))
        return nbytes

    for path in cfg.models:
        budgets.setdefault(add_model(path, ""), "")
    if cfg.build:
        from msrnn.build import build

        bcfg = cfg.build_config()
        for b in sorted(cfg.state_bytes):
            for family in bcfg.families:
                path, sizing = build(family, cfg.base, b, bcfg, progress=progress)
                if path is None:
                    notes.append(f"{family} cannot fit {b:,} bytes with {Path(cfg.base).name}'s width "
                                 "(its smallest sensible size is larger)")
                    continue
                add_model(str(path), f"{family}@{b}", budget=b, sizing=sizing)
    for b in sorted(budgets):
        for p in cfg.policies:
            knobs, nbytes = fit(kv.name, base.model, b, kv.knobs(policy=p, prefill=KV_PREFILL))
            if knobs is None:
                notes.append(f"kv:{p} skipped at {b:,} bytes: fewer than 8 slots per layer fit")
                continue  # fewer than 8 slots per layer is not a meaningful cache
            entries.append(Entry(f"kv:{p}@{b}", kv.name, cfg.base, policy=p, slots=knobs.budget, budget_bytes=b,
                                 state_bytes=nbytes))
    if cfg.task_steps:
        entries += _task_tuned(cfg, entries, progress)
    return entries, notes


def _task_tuned(cfg: CompareConfig, entries: list[Entry], progress: bool) -> list[Entry]:
    """Copies of the KV and built entries whose model was fine-tuned on the task with the same steps (the base
    model once, for every KV entry; each built model at its own size)."""
    from msrnn.build import build_task

    tune = cfg.task_tune_config()
    tuned: dict[tuple[str, str], str] = {}  # (family, base) -> the tuned model: the base once for every policy
    out = []
    for e in entries:
        if e.knobs() is not None and e.model == cfg.base:  # a family applied to the base model: tune the base
            key = (e.family, e.model)
            if key not in tuned:
                tuned[key] = str(build_task(e.family, cfg.base, tune, progress=progress))
            out.append(Entry(**{**asdict(e), "name": f"{e.name}+{cfg.task}", "model": tuned[key]}))
        elif e.sizing:
            model = str(build_task(e.family, e.model, tune, progress=progress))
            out.append(Entry(**{**asdict(e), "name": f"{e.name}+{cfg.task}", "model": model}))
    return out


def _load(entry: Entry) -> Any:
    """The entry's model, bound by its family's knobs where the family is applied to a loaded model (KV)."""
    from msrnn.families import FAMILIES
    from msrnn.models import load_lm

    lm, knobs = load_lm(entry.model), entry.knobs()
    return lm if knobs is None else FAMILIES.get(entry.family).apply(lm, knobs)


def run_entry(entry: Entry, cfg: CompareConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate one entry: perplexity, state bytes, tokens/s and a streaming profile."""
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
                           "state_bytes": max(res.peak_state_bytes, entry.state_bytes
                                              if entry.state_bytes is not None
                                              else measure_state_bytes(lm, cfg.probe_tokens)),
                           "eval_peak_state_bytes": res.peak_state_bytes, "tokens_per_s": res.tokens_per_s,
                           "nonfinite": res.nonfinite, "ppl_by_position": [[float(x), float(y)]
                                                                         for x, y in zip(xs, ys, strict=True)]}
    from msrnn.bench.stream import stream_bench

    chunk = min(cfg.chunk_size, cfg.profile_tokens)
    prof = stream_bench(lm, cfg.profile_tokens, chunk=chunk, samples=8)
    out["profile"] = [{"tokens": r["tokens"], "state_bytes": r["state_bytes"], "rss_mib": r["rss_mib"],
                       "tokens_per_s": chunk / max(r["ms_per_chunk"] / 1e3, 1e-9)} for r in prof["rows"]]
    from msrnn.families import lm_family
    from msrnn.models.loading import read_meta

    # msrnn.json names the task for models msrnn trained; an RMT's own config names it too (saved by hand or
    # elsewhere)
    trained_task = (read_meta(Path(entry.model)).get("task") if Path(entry.model).is_dir() else None) or \
        lm_family(lm).trained_task(lm)[0]
    if cfg.task:
        from msrnn.evaluate.tasks import TaskEvalConfig, evaluate_task
        from msrnn.tasks import TaskGenerator, noise_sentences

        gen = TaskGenerator(cfg.task, lm.tokenizer, noise_sentences("stdlib", "test"))
        rows = evaluate_task(lm, gen, [n * cfg.segment_length for n in cfg.task_segments],
                             TaskEvalConfig(samples=cfg.task_samples, chunk_size=cfg.segment_length))
        out["task"] = [{"segments": n, **r} for n, r in zip(cfg.task_segments, rows, strict=True)]
        out["task_trained"] = trained_task == cfg.task
        out["task_chance"] = 1.0 / len(gen.labels)
    if cfg.longctx:
        from msrnn.evaluate.longctx import LongCtxConfig, evaluate_longctx
        from msrnn.tasks.longctx import LongCtxGenerator
        from msrnn.tasks.noise import noise_sentences

        haystack = noise_sentences(cfg.longctx_data, "test")
        probe_cfg = LongCtxConfig(samples=cfg.longctx_samples, chunk_size=cfg.chunk_size)
        rows = []
        for t in cfg.longctx:
            rows += evaluate_longctx(lm, LongCtxGenerator(t, lm.tokenizer, haystack), cfg.longctx_lengths,
                                     cfg.longctx_depths, probe_cfg)
        out["longctx"] = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    return out


def _entry_file(out: Path, entry: Entry) -> Path:
    return out / "entries" / (entry.name.replace(":", "_").replace("@", "_at_").replace("/", "_") + ".json")


def _saved_entry(path: Path) -> dict[str, Any] | None:
    """A finished entry's results, or None when the file is damaged or its perplexity is not a finite number (the
    evaluator never writes one, so such a file was edited or cut short)."""
    import math

    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    ppl = saved.get("ppl") if isinstance(saved, dict) else None
    if not isinstance(ppl, int | float) or isinstance(ppl, bool) or not math.isfinite(ppl):
        return None
    return saved


def compare(cfg: CompareConfig, root: str | Path, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Evaluate every planned entry into ``root/<cfg.folder_name()>`` (skipping entries already done there) and
    write the report; returns it with ``folder`` set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from msrnn.ui import err_console

    out = Path(root) / cfg.folder_name()
    plan_file = out / "plan.json"
    if resume and plan_file.exists():  # the plan builds and measures every model and fits every slot count: once
        try:
            saved = json.loads(plan_file.read_text())
            entries, notes = [Entry(**e) for e in saved["entries"]], list(saved["notes"])
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            raise DataError(f"{plan_file} is damaged (not the plan msrnn wrote); delete it, or rerun with --fresh, to "
                            "plan again") from None
    else:
        entries, notes = plan(cfg, progress=progress)
        write_json(plan_file, {"entries": [asdict(e) for e in entries], "notes": notes})
    key = cfg.eval_key()
    results = []
    with Progress(TextColumn("[bold]compare {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress, console=err_console) as bar:
        job = bar.add_task("", total=len(entries))
        for entry in entries:
            bar.update(job, description=entry.name)
            path = _entry_file(out, entry)
            if resume and path.exists():
                saved = _saved_entry(path)  # None when damaged: the entry runs again
                if saved is not None and saved.get("eval_key") == key:
                    results.append({**saved, "resumed": True})
                    bar.advance(job)
                    continue
            res = {**run_entry(entry, cfg), "eval_key": key}
            write_json(path, res)
            results.append({**res, "resumed": False})
            bar.advance(job)
    report = {"schema": SCHEMA_VERSION, "folder": str(out), "config": asdict(cfg), "entries": results,
              "notes": notes}
    write_json(out / "results.json", stamped(report))
    from msrnn.compare_report import write_report

    write_report(report, out)
    return report
