"""Fill the figure blocks of README.md and docs/**/*.md from the JSON under docs/results, so a figure quoted in
prose pages is the saved measurement, with the command and load it was measured under.

A block is written as

    <!-- figures: NAME -->
    (what this script writes)
    <!-- /figures -->

and NAME is one of the renderers below. ``--check`` exits 1 when any block differs from what its JSON makes (CI).

    python scripts/docs_figures.py            # rewrite every block
    python scripts/docs_figures.py --check    # exit 1 if a block is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)
RENDERERS: dict[str, Callable[[], str]] = {}


def renderer(name: str):
    def add(fn: Callable[[], str]) -> Callable[[], str]:
        RENDERERS[name] = fn
        return fn
    return add


def _load(rel: str) -> dict:
    return json.loads((RESULTS / rel).read_text())


def _provenance(data: dict, rel: str) -> str:
    p = data.get("provenance") or {}
    if not p:
        return f"([JSON]({rel}); its command and load were not recorded in the file)"
    load = " / ".join(map(str, p.get("load_at_start") or [])) or "?"
    return (f"`{p.get('command')}` — {p.get('date')}, {p.get('device')}, {p.get('threads')} thread(s), load average "
            f"{load} (1/5/15 min) at the start; torch {p.get('torch')}, transformers {p.get('transformers')}")


def _x(v: float) -> str:
    return f"{v:.2f}x"


@renderer("kv-prefill")
def kv_prefill() -> str:
    """Prefill speed against the full cache: one 8k chunk and 512-token chunks, for each policy and mode."""
    runs = {c: _load(f"bench_kv_prefill_8k_chunk{c}/results.json") for c in (8192, 512)}
    policies = list(dict.fromkeys(r["variant"].split("@")[0] for r in runs[8192]["rows"] if "@" in r["variant"]))
    budget = runs[8192]["budget"]
    lines = ["| prefill of 8,192 tokens, speed vs the full cache | " + " | ".join(policies) + " |",
             "|---|" + "---|" * len(policies)]
    for c, label in ((8192, "one 8,192-token chunk"), (512, "512-token chunks")):
        got = {r["variant"]: r["vs full"] for r in runs[c]["rows"]}
        for mode in ("exact", "oneshot"):
            cells = [_x(got[f"{p}@{budget} {mode}"]) for p in policies]
            lines.append(f"| {label}, `{mode}` | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {_provenance(runs[c], f'bench_kv_prefill_8k_chunk{c}/results.json')}" for c in runs]]
    return "\n".join(lines) + "\n"


@renderer("peers-kvpress")
def peers_kvpress() -> str:
    """msrnn next to kvpress: kept tokens, prefill and hard-budget decode, each against its own full cache."""
    data = _load("peers_kvpress/results.json")
    sides = data["sides"]
    lines = ["| prompt | TOVA kept sets equal | StreamingLLM kept sets equal | prefill: msrnn `oneshot` | "
             "msrnn `exact` (default) | kvpress | hard-budget decode: msrnn | kvpress |",
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


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fill(text: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"unknown figures block {name!r}; known: {', '.join(sorted(RENDERERS))}")
        return m.group(1) + RENDERERS[name]() + m.group(4)
    return BLOCK.sub(sub, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a block is stale (CI)")
    args = p.parse_args()
    stale = []
    for page in pages():
        text = page.read_text()
        new = fill(text)
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"stale figures in {', '.join(str(s.relative_to(ROOT)) for s in stale)}: run python "
              "scripts/docs_figures.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
