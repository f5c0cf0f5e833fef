"""Write every page made from the JSON under docs/results: the results page (docs/results/index.md: each result's
command, versions and load, its scalars, its rows as a table and its PNGs) and the figure blocks of README.md and the
docs pages (scripts/figures.py), so a figure shown anywhere is the saved measurement.

    python scripts/docs_results.py            # write them
    python scripts/docs_results.py --check    # exit 1 if a saved page or block differs from the JSON (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import figures

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
OUT = RESULTS / "index.md"
PROVENANCE = ("command", "model", "torch", "transformers", "threads", "device", "load", "date")
MAX_ROWS = 12


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return "…"
    return " ".join(str(v).split()).replace("|", "\\|")


def _table(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    if not cols:
        return []
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        out.append(f"\n({len(rows) - MAX_ROWS} more rows in the JSON)")
    return out


def _result(path: Path) -> list[str]:
    rel = path.relative_to(RESULTS)
    lines = [f"## `{rel}`", ""]
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return lines + ["(not valid JSON)", ""]
    if isinstance(data, list):
        data = {"rows": data}
    stamp = data.get("provenance") if isinstance(data.get("provenance"), dict) else None
    prov = stamp or {k: data[k] for k in PROVENANCE if k in data and not isinstance(data[k], (list, dict))}
    if stamp is None and figures.recorded(rel.as_posix()):
        prov = {**figures.recorded(rel.as_posix()), **prov}
        stamp = prov
    shown = {k: " / ".join(map(str, v)) if isinstance(v, list) else v for k, v in prov.items() if v is not None}
    lines.append("Provenance: " + ("; ".join(f"{k} `{_fmt(v)}`" for k, v in shown.items()) if shown
                                   else "not recorded in the file (see the study page's command)"))
    lines.append("")
    scalars = {k: v for k, v in data.items() if (stamp is not None or k not in prov)
               and not isinstance(v, (list, dict))}
    if scalars:
        lines += ["| field | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in scalars.items()], ""]
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            table = _table(value)
            if table:
                lines += [f"**{key}**", "", *table, ""]
    for png in sorted(path.parent.glob("*.png")) if path.name == "results.json" else []:
        lines += [f"![{png.stem}]({png.relative_to(RESULTS)})", ""]
    return lines


def render() -> str:
    lines = ["# Results", "", "Generated from the JSON under `docs/results/` by `python scripts/docs_results.py` (CI "
             "fails if this page is stale). The studies quote these files through the figure blocks the same script "
             "fills (`scripts/figures.py`). A result saved before results carried their provenance shows what "
             "`docs/results/provenance.json` recorded from the study page when it was measured.", ""]
    for path in sorted(p for p in RESULTS.rglob("*.json") if p.name != "provenance.json"):
        lines += _result(path)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a saved page or block is stale (CI)")
    args = p.parse_args()
    wanted = {OUT: render()}
    for page in figures.pages():
        wanted[page] = figures.fill(page.read_text())
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        if stale:
            print(f"stale: {', '.join(str(s.relative_to(figures.ROOT)) for s in stale)}; run python "
                  "scripts/docs_results.py", file=sys.stderr)
            return 1
        return 0
    for path in stale:
        path.write_text(wanted[path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
