"""The figure blocks of README.md and docs/**/*.md, filled from the JSON under docs/results, so a figure quoted in
prose pages is the saved measurement, with the command and load it was measured under. ``scripts/docs_results.py``
writes (or, with ``--check``, checks) them together with the results page.

A block is written as

    <!-- figures: NAME -->
    (what the renderer NAME writes)
    <!-- /figures -->

and NAME is one of the renderers below; a renderer names its source files, whose provenance follows the block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)
RENDERERS: dict[str, Callable[[], str]] = {}


def renderer(name: str, *sources: str):
    """Register a block renderer; each of ``sources`` (paths under docs/results) gets a provenance line after it."""
    def add(fn: Callable[[], str]) -> Callable[[], str]:
        def render() -> str:
            body = fn()
            if sources:
                body += "\n" + "".join(f"- {_provenance(_load(src), src)}\n" for src in sources)
            return body
        RENDERERS[name] = render
        return fn
    return add


def _load(rel: str) -> dict:
    return json.loads((RESULTS / rel).read_text())


def recorded(rel: str) -> dict | None:
    """What docs/results/provenance.json records for a result saved before results carried their provenance."""
    from fnmatch import fnmatch

    table = json.loads((RESULTS / "provenance.json").read_text())
    return next((v for k, v in table.items() if not k.startswith("_") and fnmatch(rel, k)), None)


def _provenance(data: dict, rel: str) -> str:
    p = data.get("provenance") or {}
    if not p:
        old = recorded(rel)
        if old is None:
            return f"`docs/results/{rel}` records no command or load (measured before results carried them)"
        return (f"`{old['command']}`" + (f" — {old['date']}" if old.get("date") else "") +
                f"; load: {old.get('load', 'not recorded')} (recorded in `docs/results/provenance.json`)")
    load = " / ".join(map(str, p.get("load_at_start") or [])) or "?"
    return (f"`{p.get('command')}` — {p.get('date')}, {p.get('device')}, {p.get('threads')} thread(s), load average "
            f"{load} (1/5/15 min) at the start; torch {p.get('torch')}, transformers {p.get('transformers')}")


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _prefill_table(prefix: str, title: str) -> tuple[list[str], dict[int, dict]]:
    runs = {c: _load(f"{prefix}_chunk{c}/results.json") for c in (8192, 512)
            if (RESULTS / f"{prefix}_chunk{c}/results.json").exists()}
    first = next(iter(runs.values()))
    policies = list(dict.fromkeys(r["variant"].split("@")[0] for r in first["rows"] if "@" in r["variant"]))
    budget = first["budget"]
    lines = [f"| {title} | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for c, label in ((8192, "one 8,192-token chunk"), (512, "512-token chunks")):
        if c not in runs:
            continue
        got = {r["variant"]: r["vs full"] for r in runs[c]["rows"]}
        for mode in ("exact", "oneshot"):
            cells = [_x(got[f"{p}@{budget} {mode}"]) for p in policies]
            lines.append(f"| {label}, `{mode}` | " + " | ".join(cells) + " |")
    return lines, runs


@renderer("kv-prefill")
def kv_prefill() -> str:
    """Prefill speed against the full cache: one 8k chunk and 512-token chunks, for each policy and mode; the
    `small` shape, then Qwen2.5-0.5B's shape where it was measured."""
    lines, runs = _prefill_table("bench_kv_prefill_8k", "`small` shape, 8,192 tokens: speed vs the full cache")
    lines += ["", *[f"- {_provenance(runs[c], f'bench_kv_prefill_8k_chunk{c}/results.json')}" for c in runs]]
    if (RESULTS / "bench_kv_prefill_qwen_8k_chunk8192/results.json").exists():
        qwen, qruns = _prefill_table("bench_kv_prefill_qwen_8k", "Qwen2.5-0.5B's shape, 8,192 tokens")
        lines += ["", *qwen, "",
                  *[f"- {_provenance(qruns[c], f'bench_kv_prefill_qwen_8k_chunk{c}/results.json')}" for c in qruns]]
    return "\n".join(lines) + "\n"


@renderer("peers-kvpress")
def peers_kvpress() -> str:
    """msrnn next to kvpress: kept tokens, prefill and hard-budget decode, each against its own full cache."""
    data = _load("peers_kvpress/results.json")
    sides = data["sides"]
    lines = ["| prompt | TOVA kept sets equal | StreamingLLM kept sets equal | prefill: msrnn `oneshot` | "
             "msrnn `exact` (the default prefill) | kvpress | hard-budget decode: msrnn | kvpress |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['tokens']:,} tokens, {r['budget']} slots | {r['TOVA kept sets equal (layer x KV head)']} | "
                     f"{r['StreamingLLM kept sets equal']} | {_x(r['msrnn prefill oneshot vs own full'])} | "
                     f"{_x(r['msrnn prefill exact vs own full'])} | {_x(r['kvpress prefill vs own full'])} | "
                     f"{_x(r['msrnn hard-budget decode vs own full'])} | "
                     f"{_x(r['kvpress hard-budget decode vs own full'])} |")
    lines += ["", "Kept sets: layer × KV head pairs holding the same positions. Speeds: each library against its own "
              "full cache in the same process (above 1x is faster than the full cache)."]
    lines += ["", "| bounded StreamingLLM, 256-token prompt, 32 slots, 40 decode steps | holds | wrongly held | "
              "newest missing |", "|---|---|---|---|"]
    for r in data["streaming_llm"]:
        lines.append(f"| {r['library']} | {r['held after the last step']} | {r['positions wrongly held']} | "
                     f"{r['newest positions missing']} |")
    lines += ["", f"- {_provenance(data, 'peers_kvpress/results.json')}",
              f"- sides: {sides['msrnn']['library']} (transformers {sides['msrnn']['transformers']}), "
              f"{sides['kvpress']['library']} (transformers {sides['kvpress']['transformers']})"]
    return "\n".join(lines) + "\n"


def _f(v: float, digits: int = 2) -> str:
    return f"{v:,.{digits}f}"


def _sweep(task: str) -> str:
    data = _load("kv_sweep/results.json")
    rows = [r for r in data["rows"] if r["task"] == task]
    full = next(r for r in rows if r["policy"] == "full")
    budgets = sorted({r["budget"] for r in rows if r["policy"] != "full"})
    policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"))
    ppl = {(r["policy"], r["budget"]): r["ppl"] for r in rows}
    ctx = data["context"]
    lines = [f"({full['documents']} held-out documents of {ctx} tokens; full cache: {_f(full['ppl'])})", "",
             "| policy | " + " | ".join(f"{b} (1/{ctx // b})" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    lines += [f"| {p} | " + " | ".join(_f(ppl[p, b]) for b in budgets) + " |" for p in policies]
    return "\n".join(lines) + "\n"


@renderer("kv-sweep-plain", "kv_sweep/results.json")
def kv_sweep_plain() -> str:
    """Perplexity versus budget on held-out code."""
    return _sweep("plain")


@renderer("kv-sweep-copy", "kv_sweep/results.json")
def kv_sweep_copy() -> str:
    """Perplexity versus budget on the copy task."""
    return _sweep("copy")


@renderer("kv-analysis", "kv_analysis_tova/results.json")
def kv_analysis() -> str:
    """Which first positions TOVA keeps, and which token kinds."""
    data = _load("kv_analysis_tova/results.json")
    lines = ["| layer | pos 0 | pos 1 | pos 2 | pos 3 |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | " + " | ".join(_f(r[f"pos{i}"]) for i in range(4)) + " |"
              for r in data["first_token_survival"]]
    lines += ["", "Token kinds kept relative to their base rate (ratio > 1 = favoured):", "",
              "| kind | share of tokens seen | share of kept slots | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {_f(r['base_rate'], 3)} | {_f(r['kept_share'], 3)} | {_f(r['ratio'])} |"
              for r in data["token_kinds"]]
    return "\n".join(lines) + "\n"


@renderer("kv-decode")
def kv_decode() -> str:
    """Decode speed versus context: the full cache, a plain cache of the budget, window and TOVA."""
    data = _load("bench_kv/results.json")
    k = data["budget"]
    lines = [f"| context | full tok/s | plain@{k} | window@{k} | tova@{k} | tova naive | TOVA / full | ceiling | "
             "of ceiling | TOVA / window | fixed / naive | full KV MiB | TOVA KV MiB | of limit (full / TOVA) |",
             "|" + "---|" * 14]
    for r in data["rows"]:
        t, lim = (lambda v, r=r: r[f"{v} tok/s"]), (lambda v, r=r: r[f"{v} limit tok/s"])
        tova = f"tova@{k}"
        lines.append(
            f"| {r['context']:,} | {t('full'):,.0f} | {t(f'plain@{k}'):,.0f} | {t(f'window@{k}'):,.0f}"
            f" | {t(tova):,.0f} | {t(f'{tova} naive'):,.0f} | {_x(r['tova/full speed'])} | "
            f"{_x(r['ceiling'])} | **{r['tova/full of ceiling']:.0%}** | {_x(r['tova/window'])} | "
            f"{_x(r['tova fixed/naive'])} | {r['full bytes'] / 2**20:.1f} | {r[f'{tova} bytes'] / 2**20:.2f} | "
            f"{t('full') / lim('full'):.0%} / {t(tova) / lim(tova):.0%} |")
    lines += ["", f"- copy bandwidth {data['copy bandwidth GB/s']:.1f} GB/s, weights "
              f"{data['weight bytes'] / 2**20:.1f} MiB, {data['threads']} thread(s), {data['rounds']} rounds of "
              f"{data['steps']} steps; {_provenance(data, 'bench_kv/results.json')}"]
    return "\n".join(lines) + "\n"


@renderer("kv-throughput", "bench_kv_throughput_4k/results.json", "bench_kv_throughput_8k/results.json")
def kv_throughput() -> str:
    """Generated tokens/s of the largest batches that fit one KV memory budget."""
    lines = ["| context, cache | KV budget | full: batch, tok/s | TOVA: batch, tok/s | throughput ratio |",
             "|---|---|---|---|---|"]
    for name in ("bench_kv_throughput_4k", "bench_kv_throughput_8k"):
        d = _load(f"{name}/results.json")
        full, tova = d["rows"][0], d["rows"][1]
        lines.append(f"| {d['context']:,}, TOVA@{d['budget']} (1/{round(1 / d['cache fraction'])}) | "
                     f"{d['memory bytes'] / 2**20:.1f} MiB | {full['batch']}, {full['tok/s']:,.0f} | "
                     f"{tova['batch']}, {tova['tok/s']:,.0f} | **{d['throughput ratio']:.1f}x** |")
    return "\n".join(lines) + "\n"


@renderer("kv-chunked-ppl", "kv_prefill_ppl/tova_exact.json")
def kv_chunked_ppl() -> str:
    """The perplexity cost of chunked and one-shot prefill against exact prefill."""
    lines = ["| policy@128 | prefill | ppl | vs exact | most slots carried (per layer) | peak state bytes | tok/s |",
             "|---|---|---|---|---|---|---|"]
    for policy in ("tova", "h2o"):
        exact = _load(f"kv_prefill_ppl/{policy}_exact.json")["ppl"]
        for mode, name in (("exact", "exact"), ("chunked:16", "chunked_16"), ("chunked:64", "chunked_64"),
                           ("chunked:128", "chunked_128"), ("oneshot", "oneshot")):
            d = _load(f"kv_prefill_ppl/{policy}_{name}.json")
            k = int(d["policy"].split("@")[1])
            # Until its eviction a group's tokens pile up on the k kept slots: C - 1 more for chunked:C, the chunk's
            # tokens less one for oneshot, none for exact (kv.cache's peak-state accounting).
            extra = {"exact": 0, "oneshot": d["chunk_size"] - 1}.get(mode, int(mode.partition(":")[2] or 1) - 1)
            carried = f"{k} + {extra}" if extra else str(k)
            lines.append(f"| {policy} | `{mode}` | {_f(d['ppl'])} | {d['ppl'] / exact - 1:+.1%} | {carried} | "
                         f"{d['peak_state_bytes']:,} | {d['tokens_per_s']:,.0f} |")
    full = _load("kv_prefill_ppl/full.json")
    lines += ["", f"Full cache: {_f(full['ppl'])}."]
    return "\n".join(lines) + "\n"


def _bucket(ev: dict, start: int, end: int) -> float:
    return next(b["ppl"] for b in ev["buckets"] if (b["start"], b["end"]) == (start, end))


def _bst_rows(prefix: str, variants: list[str], with_params: bool) -> str:
    head = ["model", *(["params"] if with_params else []), "val loss", "ppl first 256 (L)", "first 1024 (4L)",
            "first 4096 (16L)", "tokens 128–256", "512–1024", "2048–4096", "state bytes", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        tr, ev = _load(f"bst/train{prefix}_{v}.json"), _load(f"bst/eval{prefix}_{v}.json")
        cells = [tr["model"] + (f" ({tr['steps']})" if prefix else ""),
                 *([f"{tr['params'] / 1e6:.2f}M"] if with_params else []), f"{tr['val_loss']:.3f}",
                 *(f"{ev['ppl_at'][n]:.1f}" for n in ("256", "1024", "4096")),
                 *(f"{_bucket(ev, a, b):.1f}" for a, b in ((128, 256), (512, 1024), (2048, 4096))),
                 f"{ev['peak_state_bytes']:,}", f"{tr['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@renderer("bst-300", "bst/eval_sh-s4.json")
def bst_300() -> str:
    """Five BST variants after 300 steps: perplexity by position, state bytes."""
    return _bst_rows("", ["slide", "sh-s4", "mh-s4", "mf-s4", "sh-unstruct"], with_params=True)


@renderer("bst-900", "bst/eval900_sh-s4.json")
def bst_900() -> str:
    """SLIDE, SH and MH after 900 steps."""
    return _bst_rows("900", ["slide", "sh-s4", "mh-s4"], with_params=False)


@renderer("bst-bench", "bst/bench_bst.json")
def bst_bench() -> str:
    """S4D by FFT against its scan, and a BST layer against full attention."""
    d = _load("bst/bench_bst.json")
    lines = ["| L | S4D by FFT ms | recurrent scan ms | scan / FFT |", "|---|---|---|---|"]
    lines += [f"| {r['L']:,} | {r['fft ms']:,.1f} | {r['scan ms']:,.1f} | {_x(r['scan / fft'])} |" for r in d["ssm"]]
    mem = {r["L"]: r for r in d["memory"]}
    lines += ["", "| L | BST:SH layer ms | full causal attention ms | same BST layer block by block ms | full / BST | "
              "block-sequential / BST | peak RSS BST / full (MiB) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['L']:,} | {r['bst ms']:,.1f} | {r['full attn ms']:,.1f} | {r['block-sequential ms']:,.1f} | "
              f"{_x(r['full / bst'])} | {_x(r['sequential / bst'])} | {mem[r['L']]['bst MiB']} / "
              f"{mem[r['L']]['full attn MiB']} |" for r in d["layers"]]
    return "\n".join(lines) + "\n"


@renderer("supra-eval", "supra_eval_supra-150_4096.json", "supra_train.json")
def supra_eval() -> str:
    """The base softmax model against SUPRA beyond the training length."""
    lines = ["| eval length | base softmax (trained at 512) | SUPRA, 150 uptraining steps | base state | SUPRA state |",
             "|---|---|---|---|---|"]
    for n in (512, 1024, 2048, 4096):
        base, supra = _load(f"supra_eval_small-1500_{n}.json"), _load(f"supra_eval_supra-150_{n}.json")
        mib = (lambda b: f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b // 1024} KiB")
        lines.append(f"| {n} ({n // 512}x) | {_f(base['ppl'])} | {_f(supra['ppl'])} | "
                     f"{mib(base['peak_state_bytes'])} | {mib(supra['peak_state_bytes'])} |")
    t = _load("supra_train.json")
    lines += ["", f"Uptraining: {t['steps']} steps, {t['tokens']:,} tokens, {t['seconds']:.0f} s, val loss "
              f"{t['val_loss']:.3f}."]
    return "\n".join(lines) + "\n"


@renderer("supra-bench", "bench_supra/results.json")
def supra_bench() -> str:
    """Linear-attention forms against SDPA, and decode cost versus position."""
    d = _load("bench_supra/results.json")
    lines = ["| T | naive loop ms | chunked ms | softmax SDPA ms | chunked vs naive | SDPA / chunked |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['naive ms']:.1f} | {r['chunked ms']:.1f} | {r['sdpa ms']:.1f} | "
              f"{r['chunked vs naive']:.1f}x | {_x(r['sdpa / chunked'])} |" for r in d["ops"]["rows"]]
    first, last = d["decode"]["rows"][0], d["decode"]["rows"][-1]
    lines += ["", f"Linear attention beats softmax SDPA from T = {d['ops']['crossover_T']:,}. Decode: "
              f"{first['ms/token']:.2f} ms/token at position {first['position']:,} against {last['ms/token']:.2f} at "
              f"{last['position']:,} (ratio {d['decode']['ratio_last_first']:.2f}), state {last['state bytes']:,} "
              "bytes at both."]
    return "\n".join(lines) + "\n"


@renderer("streams", "stream_rmt_1M/results.json", "stream_supra_1M/results.json")
def streams() -> str:
    """1M-token streams: flat memory, constant time per chunk, no non-finite logits."""
    lines = ["| family | tokens | wall | tok/s | RSS over the stream | ms per chunk, early → late | "
             "state bytes between chunks | non-finite logits |", "|---|---|---|---|---|---|---|---|"]
    for name, label in (("stream_rmt_1M", "RMT (16 mem, 512 seg)"), ("stream_supra_1M", "SUPRA (lightning decay)")):
        d = _load(f"{name}/results.json")
        rss = [r["rss_mib"] for r in d["rows"]]
        states = sorted({r["state_bytes"] for r in d["rows"]})
        lines.append(f"| {label} | {d['tokens']:,} | {d['seconds']:.0f} s | {d['tokens_per_s']:,.0f} | "
                     f"{min(rss):.1f}–{max(rss):.1f} MiB | {d['ms_per_chunk_first']:.1f} → "
                     f"{d['ms_per_chunk_last']:.1f} | {', '.join(f'{b:,}' for b in states)} | {d['nonfinite']} |")
    return "\n".join(lines) + "\n"


@renderer("rmt-tasks", "rmt/eval_memorize.json")
def rmt_tasks() -> str:
    """Accuracy versus segments after the curriculum, per task."""
    rows = (("memorize", "memorize"), ("detect", "detect & memorize"),
            ("reasoning", "reasoning (qa4-style, two facts)"),
            ("encoder_memorize", "memorize, **encoder** (`--from minilm`, 10 memory tokens)"))
    first = _load("rmt/eval_memorize.json")["results"]
    head = [f"{r['segments']} seg" if i == 0 else str(r["segments"]) for i, r in enumerate(first)]
    head[-1] += f" ({first[-1]['tokens']:,} tokens)"
    lines = ["| task | curriculum (step: segments) | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for name, label in rows:
        ev = _load(f"rmt/eval_{name}.json")["results"]
        if (RESULTS / f"rmt/train_{name}_meta.json").exists():
            meta = _load(f"rmt/train_{name}_meta.json")
            cur = ", ".join(f"{c['step']}: {c['to']}" for c in meta["curriculum"])
            cur += f" (by {' and '.join(sorted({c['reason'] for c in meta['curriculum']}))}); {meta['step']} steps"
        else:
            cur = "not saved with the results"
        lines.append(f"| {label} | {cur} | " + " | ".join(f"{r['accuracy']:.0%}" for r in ev) + " |")
    return "\n".join(lines) + "\n"


@renderer("rmt-1m", "rmt/eval_memorize_1M.json")
def rmt_1m() -> str:
    """RMT memorize at one million tokens."""
    d = _load("rmt/eval_memorize_1M.json")
    lines = ["| segments | tokens | right | state bytes | seconds | peak RSS MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['segments']:,} | {r['tokens']:,} | {round(r['accuracy'] * r['samples'])} of {r['samples']} | "
              f"{r['peak_state_bytes']:,} | {r['seconds']:.0f} | {r['peak_rss_mib']} |" for r in d["results"]]
    return "\n".join(lines) + "\n"


def _knobs(e: dict) -> str:
    if e.get("slots"):
        return f"{e['slots']} slots"
    short = {"feature_dim": "F", "block_size": "W", "state_size": "N", "segment_length": "S", "num_memory_tokens": "m"}
    order = ("segment_length", "num_memory_tokens", "block_size", "state_size", "feature_dim")
    items = sorted((e.get("sizing") or {}).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in items)


_COLUMNS = (("kv:window", "KV window"), ("kv:sink", "KV sink"), ("kv:h2o", "KV H2O"), ("kv:tova", "KV TOVA"),
            ("rmt", "RMT (built)"), ("bst", "BST:SH (built)"), ("supra", "SUPRA (built)"))


@renderer("compare-ppl", "compare/compare-small-d877b5cc3e/results.json")
def compare_ppl() -> str:
    """Perplexity of every family and KV policy at equal state bytes (the best of each row in bold)."""
    rel = "compare/compare-small-d877b5cc3e/results.json"
    d = _load(rel)
    by = {e["name"]: e for e in d["entries"]}
    lines = ["| budget | " + " | ".join(label for _, label in _COLUMNS) + " |", "|---|" + "---:|" * len(_COLUMNS)]
    for b in d["config"]["budgets"]:
        got = [by.get(f"{name}@{b}") for name, _ in _COLUMNS]
        best = min(e["ppl"] for e in got if e)
        cells = []
        for e in got:
            if e is None:
                cells.append("n/a")
                continue
            ppl = f"**{e['ppl']:.2f}**" if e["ppl"] == best else f"{e['ppl']:.2f}"
            cells.append(f"{ppl} ({_knobs(e)})")
        size = f"{b // 2**20} MiB" if b % 2**20 == 0 else f"{b // 1024:,} KiB"
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    full = by["full"]
    lines.append(f"| full cache, {full['eval_peak_state_bytes'] / 2**20:.0f} MiB at {d['config']['max_tokens']:,} "
                 "tokens | " + " | " * (len(_COLUMNS) - 1) + f"base model: {full['ppl']:.2f} |")
    lines += ["", "Every entry, its state bytes and tokens/s: the run's `report.md`."]
    return "\n".join(lines) + "\n"


@renderer("compare-task", "compare/compare-small-f385715506/results.json",
          "compare/compare-small-59b5b594ba/results.json")
def compare_task() -> str:
    """Memory-task accuracy at equal bytes after 200 and 600 task-training steps."""
    runs = {200: _load("compare/compare-small-f385715506/results.json"),
            600: _load("compare/compare-small-59b5b594ba/results.json")}
    segs = " / ".join(str(n) for n in runs[200]["config"]["task_segments"])
    labels = (("kv:h2o", "KV **H2O** on the tuned base"), ("kv:tova", "KV TOVA on the tuned base"),
              ("kv:window", "KV window on the tuned base"), ("kv:sink", "KV sink on the tuned base"),
              ("supra", "SUPRA (built, then tuned)"), ("bst", "BST:SH (built, then tuned)"),
              ("rmt", "RMT (built, then tuned)"))
    lines = [f"| state (256 KiB), accuracy at {segs} segments | 200 steps | 600 steps |", "|---|---|---|"]
    for name, label in labels:
        cells, knobs = [], ""
        for steps in (200, 600):
            e = next((e for e in runs[steps]["entries"] if e["name"] == f"{name}@262144+memorize"), None)
            cells.append(" / ".join(f"{r['accuracy']:.2f}" for r in e["task"]) if e else "not run")
            knobs = knobs or (f" ({_knobs(e)})" if e else "")
        lines.append(f"| {label}{knobs} | " + " | ".join(cells) + " |")
    chance = next(e["task_chance"] for e in runs[200]["entries"] if e.get("task"))
    lines += ["", f"Chance is {chance:.2f}; {runs[200]['config']['task_samples']} fresh samples per length."]
    return "\n".join(lines) + "\n"


@renderer("kv-compile", "bench_kv_compile/results.json")
def kv_compile() -> str:
    """The in-place decode step under torch.compile against eager, the plain and the full cache."""
    d = _load("bench_kv_compile/results.json")
    k = d["budget"]
    lines = [f"| context | full | plain@{k} | tova@{k} eager | tova@{k} compiled | compiled / eager | "
             "compiled / plain | compiled / full |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        full, plain = r["full tok/s"], r[f"plain@{k} tok/s"]
        eager, comp = r[f"tova@{k} tok/s"], r[f"tova@{k} compiled tok/s"]
        lines.append(f"| {r['context']:,} | {full:,.0f} | {plain:,.0f} | {eager:,.0f} | {comp:,.0f} | "
                     f"**{_x(r['tova compiled/eager'])}** | {_x(r['tova compiled/plain'])} | {_x(comp / full)} |")
    eager_plain = [r["tova/plain"] for r in d["rows"]]
    lines += ["", f"Eager TOVA@{k} against the plain cache in this run: "
              f"{_x(min(eager_plain))}–{_x(max(eager_plain))}."]
    return "\n".join(lines) + "\n"


@renderer("kv-prefill-modes", "bench_kv_prefill/results.json")
def kv_prefill_modes() -> str:
    """Prefill in 512-token chunks per mode, with the readable twin, against the full cache."""
    d = _load("bench_kv_prefill/results.json")
    k = d["budget"]
    got = {r["variant"]: r for r in d["rows"]}
    policies = ["tova", "h2o", "window"]
    lines = ["| variant | " + " | ".join(f"{p} tok/s | vs full" for p in policies) + " |", "|---|" + "---|---|" * 3]
    full = got["full"]
    lines.append(f"| full cache | {full['tok/s']:,.0f} | {_x(1.0)} |" + " | |" * 2)
    for mode, label in (("exact", "`exact` (fast)"), ("exact (reference twin)", "`exact`, readable twin (1 round)"),
                        ("chunked:64", "`chunked:64`"), ("oneshot", "`oneshot`")):
        cells = []
        for p in policies:
            r = got[f"{p}@{k} {mode}"]
            cells.append(f"{r['tok/s']:,.0f} | {_x(r['vs full'])}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@renderer("kv-shapes", "bench_kv_qwen2.5-0.5b/results.json", "bench_kv_llama-3.2-1b/results.json")
def kv_shapes() -> str:
    """Decode at real models' shapes (random weights) with the copy-bandwidth limit."""
    k = 512
    lines = [f"| shape | context | full tok/s (of limit) | plain@{k} | window@{k} | TOVA@{k} (of limit) | "
             "TOVA / full | ceiling | TOVA / window | fixed / naive | full KV MiB | TOVA KV MiB |", "|" + "---|" * 12]
    facts = []
    for name, label in (("qwen2.5-0.5b", "Qwen2.5-0.5B"), ("llama-3.2-1b", "Llama-3.2-1B")):
        d = _load(f"bench_kv_{name}/results.json")
        facts.append(f"{label}: weights {d['weight bytes'] / 2**20:,.0f} MiB, copy bandwidth "
                     f"{d['copy bandwidth GB/s']:.1f} GB/s")
        for r in d["rows"]:
            t = f"tova@{k}"
            full_limit = r["full tok/s"] / r["full limit tok/s"]
            lines.append(
                f"| {label} | {r['context']:,} | {r['full tok/s']:.2f} ({full_limit:.0%}) | "
                f"{r[f'plain@{k} tok/s']:.2f} | {r[f'window@{k} tok/s']:.2f} | {r[f'{t} tok/s']:.2f} "
                f"({r[f'{t} tok/s'] / r[f'{t} limit tok/s']:.0%}) | {_x(r['tova/full speed'])} | {_x(r['ceiling'])} | "
                f"{_x(r['tova/window'])} | {_x(r['tova fixed/naive'])} | {r['full bytes'] / 2**20:.1f} | "
                f"{r[f'{t} bytes'] / 2**20:.1f} |")
    lines += ["", "; ".join(facts) + "."]
    return "\n".join(lines) + "\n"


@renderer("kv-targets")
def kv_targets() -> str:
    """#14's targets, checked against the saved decode, prefill and throughput results."""
    dec, pre = _load("bench_kv/results.json"), _load("bench_kv_prefill/results.json")
    thr = _load("bench_kv_throughput_4k/results.json")
    k = dec["budget"]
    tw = [r["tova/window"] for r in dec["rows"]]
    tp = [r["tova/plain"] for r in dec["rows"]]
    last = dec["rows"][-1]
    exact = next(r["vs full"] for r in pre["rows"] if r["variant"] == f"tova@{k} exact")
    fixed = [r["tova fixed/naive"] for r in dec["rows"]]

    def verdict(ok: int, n: int) -> str:
        return "met" if ok == n else f"met at {ok} of {n} contexts"

    lines = [f"- Exact prefill (512-token chunks): {_x(exact)} of the full cache, target ≥ 0.5x: "
             f"{verdict(exact >= 0.5, 1)}.",
             f"- Throughput at 1/8 of the cache: {thr['throughput ratio']:.1f}x, target ≥ 4x: "
             f"{verdict(thr['throughput ratio'] >= 4, 1)}.",
             f"- TOVA@{k} against Window@{k}: {_x(min(tw))}–{_x(max(tw))}, target ≥ 0.97x: "
             f"{verdict(sum(v >= 0.97 for v in tw), len(tw))}.",
             f"- TOVA@{k} against a plain {k}-token cache: {_x(min(tp))}–{_x(max(tp))}, target ≥ 0.95x: "
             f"{verdict(sum(v >= 0.95 for v in tp), len(tp))}.",
             f"- Bounded against full at {last['context']:,}: {_x(last['tova/full speed'])}, "
             f"{last['tova/full of ceiling']:.0%} of the {_x(last['ceiling'])} ceiling measured in the same run, "
             f"target ≥ 95%: {verdict(last['tova/full of ceiling'] >= 0.95, 1)}.",
             f"- In-place storage alone: {_x(min(fixed))}–{_x(max(fixed))} the naive twin's speed."]
    return "\n".join(lines) + "\n"


@renderer("base-demo")
def base_demo() -> str:
    """What `msrnn demo` measured: held-out perplexity, context use, KV at 64 slots, four families at 256 KiB."""
    d = _load("demo_results.json")
    ind = d["induction"]
    lines = [f"- Held-out perplexity over {d['documents']} documents: **{d['heldout_ppl']:.1f}** (positions up to 512: "
             f"{d['heldout_ppl_within_512']:.1f}; beyond: {d['heldout_ppl_beyond_512']:.1f}).",
             f"- Context use: a held-out 256-token window scores {ind['ppl_first_half']:.1f} the first time and "
             f"{ind['ppl_repeat']:.1f} when repeated ({ind['windows']} windows).", "",
             "| KV at 64 slots, token by token | perplexity | peak state bytes |", "|---|---|---|"]
    lines += [f"| {r['policy']} | {r['ppl']:.1f} | {r['peak_state_bytes']:,} |" for r in d["kv"]]
    lines += ["", "| four families at 256 KiB (trained briefly) | perplexity | state bytes |", "|---|---|---|"]
    lines += [f"| {e['name']} | {e['ppl']:.1f} | {e['state_bytes']:,} |" for e in d["families"]["entries"]]
    lines += ["", f"- `docs/results/demo_results.json` ({_provenance(d, 'demo_results.json')})"]
    return "\n".join(lines) + "\n"


@renderer("base-small", "small_eval_512.json")
def base_small() -> str:
    """The studies' base model on held-out files."""
    d = _load("small_eval_512.json")
    return (f"Held-out perplexity of the first {d['chunk_size']} tokens of the {d['documents']} stdlib test files: "
            f"**{d['ppl']:.1f}** ({d['tokens']:,} tokens; `docs/results/small_eval_512.json`).\n")


@renderer("longctx-equal-bytes", "longctx_compare/results.json")
def longctx_equal_bytes() -> str:
    """The probes for the four families at equal state bytes (each trained family next to KV sized to its bytes)."""
    d = _load("longctx_compare/results.json")
    lengths = d["config"]["longctx_lengths"]
    entries = sorted(d["entries"], key=lambda e: (e["state_bytes"], e["family"] != "kv", e["name"]))
    chance = d["entries"][0]["longctx"][0]["chance"]
    lines = ["| entry | state bytes | " + " | ".join(f"{n} tokens" for n in lengths) + " | needle kept |",
             "|---|---:|" + "---:|" * (len(lengths) + 1)]
    for e in entries:
        cells = []
        for n in lengths:
            rs = [r for r in e["longctx"] if r["length"] == n]
            rank, exact = (sum(r[k] for r in rs) / len(rs) for k in ("rank_acc", "exact"))
            cells.append(f"{rank:.2f} / {exact:.2f}")
        kept = [r["retention"] for r in e["longctx"] if r["retention"] is not None]
        label = e["name"] + (f" ({e['slots']} slots)" if e.get("slots") else "")
        lines.append(f"| {label} | {e['state_bytes']:,} | " + " | ".join(cells) + " | "
                     + (f"{sum(kept) / len(kept):.2f}" if kept else "-") + " |")
    samples, depths = d["config"]["longctx_samples"], d["config"]["longctx_depths"]
    lines += ["", f"Rank accuracy (chance {chance:.3f}) / exact match over {', '.join(d['config']['longctx'])} and "
              f"depths {', '.join(str(x) for x in depths)}, {samples} samples per cell."]
    return "\n".join(lines) + "\n"


@renderer("longctx-families", "longctx_families/supra/results.json", "longctx_families/bst/results.json",
          "longctx_families/rmt/results.json")
def longctx_families() -> str:
    """The three trained families on the KV study's probes (5 depths, 6 samples), next to the study's full cache."""
    study = _load("longctx/results.json")
    lengths = study["lengths"]
    rows = {"full cache (the KV study)": [r for r in study["rows"] if r["variant"] == "full"]}
    for family in ("supra", "bst", "rmt"):
        rows[f"{family.upper() if family != 'supra' else 'SUPRA'} (256 KiB, tuned)"] = \
            _load(f"longctx_families/{family}/results.json")["rows"]
    lines = ["| model | " + " | ".join(f"{n} tokens" for n in lengths) + " | state bytes |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for label, rs in rows.items():
        cells = []
        for n in lengths:
            at = [r for r in rs if r["length"] == n]
            rank, exact = (sum(r[k] for r in at) / len(at) for k in ("rank_acc", "exact"))
            cells.append(f"{rank:.2f} / {exact:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {max(r['peak_state_bytes'] for r in rs):,} |")
    return "\n".join(lines) + "\n"


def pages() -> list[Path]:
    """The hand-written pages that may hold figure blocks (the generated results and reference pages hold none)."""
    docs = ROOT / "docs"
    return [ROOT / "README.md", *sorted(p for p in docs.rglob("*.md")
                                        if p.relative_to(docs).parts[0] not in ("results", "reference"))]


def fill(text: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"unknown figures block {name!r}; known: {', '.join(sorted(RENDERERS))}")
        return m.group(1) + RENDERERS[name]() + m.group(4)
    return BLOCK.sub(sub, text)


@renderer("train-memory", "bench_train_memory/results.json")
def train_memory() -> str:
    """One training step at Llama-3.2-1B's shape: what the forward keeps for the backward, before and after."""
    d = _load("bench_train_memory/results.json")
    label = {("full", False): "full logits (before)", ("chunked", False): "chunked loss",
             ("chunked", True): "chunked loss + activation checkpointing"}
    lengths = sorted({r["tokens"] for r in d["rows"]})
    lines = ["| family | loss | " + " | ".join(f"kept for backward at {n:,} tokens" for n in lengths)
             + " | per token | step peak at " + f"{lengths[-1]:,} tokens |",
             "|---|---|" + "---:|" * (len(lengths) + 2)]
    for p in d["per_token"]:
        rows = {r["tokens"]: r for r in d["rows"] if r["family"] == p["family"] and r["loss"] == p["loss"]
                and r["activation_checkpointing"] == p["activation_checkpointing"]}
        name = {"hf": "Llama (softmax)", "supra": "SUPRA"}[p["family"]]
        lines.append(f"| {name} | {label[p['loss'], p['activation_checkpointing']]} | "
                     + " | ".join(f"{rows[n]['saved_mib'] / 1024:.1f} GiB" for n in lengths)
                     + f" | {p['kib_per_token']:,.0f} KiB | {rows[lengths[-1]]['step_peak_mib'] / 1024:.1f} GiB |")
    lines += ["", f"Shape {d['shape']}, vocabulary {d['vocab']:,}, {d['precision']} (fp32 master weights and AdamW "
              "states), batch 1; per token: the slope between the two lengths. Counted on fake tensors (live tensor "
              "bytes; allocator overhead comes on top)."]
    return "\n".join(lines) + "\n"


@renderer("convert-memory", "convert_memory/results.json")
def convert_memory() -> str:
    """`msrnn convert supra`'s peak memory against the checkpoint, before and after streaming."""
    d = _load("convert_memory/results.json")
    rows = {r["mode"]: r for r in d["rows"]}
    before, now = rows["before"], rows["streamed"]
    return (f"| `convert supra` of a {d['checkpoint_mib']:,.0f} MiB bf16 checkpoint ({d['shape']} shape) | peak "
            "resident memory | x the checkpoint |\n|---|---:|---:|\n"
            f"| before ({d['before_commit']}: load, float32 SUPRA init, copy, cast) | {before['peak_mib']:,.0f} MiB | "
            f"{_x(before['x_checkpoint'])} |\n"
            f"| now (tensor by tensor into a model built in bf16) | {now['peak_mib']:,.0f} MiB | "
            f"{_x(now['x_checkpoint'])} |\n")


@renderer("fsdp-7b-estimate", "bench_train_memory_7b/results.json")
def fsdp_7b_estimate() -> str:
    """Memory per GPU for SUPRA uptraining of a 7B model on 8 GPUs, estimated from the unsharded benchmark."""
    from msrnn.models.presets import PRESETS

    d = _load("bench_train_memory_7b/results.json")
    shape = PRESETS.get(d["shape"])()
    gpus, tokens = 8, 4096
    pick = {(r["loss"], r["activation_checkpointing"]): r for r in d["rows"]
            if r["family"] == "supra" and r["tokens"] == tokens}
    ac, plain = pick["chunked", True], pick["chunked", False]
    weights = ac["weights_mib"]  # fp32 masters, MiB
    root = 2 * d["vocab"] * shape.hidden_size * 4 / 2**20  # embeddings and the untied head, fp32
    layer = (weights - root) / shape.num_layers
    recompute = (plain["saved_mib"] - ac["saved_mib"]) / shape.num_layers
    parts = [
        (f"fp32 weights, gradients and AdamW's two states, sharded {gpus} ways", 4 * weights / gpus),
        (f"kept for backward ({tokens:,} tokens, activation checkpointing)", ac["saved_mib"]),
        ("one layer's activations, recomputed in backward", recompute),
        ("two layers' gathered weights (one prefetched) and one layer's full gradients", 3 * layer),
        ("the root's embeddings and head, gathered, with their gradients", 2 * root),
        ("one loss chunk's logits (1,024 positions)", 1024 * d["vocab"] * 10 / 2**20),
    ]
    lines = ["| per GPU | GiB |", "|---|---:|"] + [f"| {n} | {v / 1024:.1f} |" for n, v in parts]
    lines += [f"| **total (estimate)** | **{sum(v for _, v in parts) / 1024:.1f}** |", "",
              f"SUPRA at {d['shape']}'s shape ({weights * 2**20 / 4 / 1e9:.2f}B parameters), vocabulary "
              f"{d['vocab']:,}, bf16-mixed, batch 1 x {tokens:,} tokens per GPU. Each part is read off the unsharded "
              "benchmark (fake tensors) or the shape; the sum is an estimate, not a measurement on GPUs. The CUDA "
              "context and the allocator's caching come on top. At the start each rank loads the whole model on "
              f"the CPU and casts it to fp32 ({weights / 1024:.0f} GiB of host memory per rank); sharding then moves "
              "one layer's weights at a time to the GPU, so no GPU holds the whole model."]
    return "\n".join(lines) + "\n"
