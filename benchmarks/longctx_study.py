"""The README's long-context probe study: a model fine-tuned with ``msrnn train longctx``, probed with its full cache
and with each KV policy at one budget, on held-out haystack (the test split) and seeds.

    python benchmarks/longctx_study.py --model runs/lc-small --budget 128 --out docs/results/longctx

writes ``<out>/<variant>/results.json`` and a heatmap per task, ``<out>/results.json`` with every row, and
``<out>/summary.md`` (the README's table). ``--check`` rebuilds the table from the saved rows and fails if
``summary.md`` differs (a stale figure).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summary(rows: list[dict], lengths: list[int]) -> str:
    """Markdown: one row per variant; per length, rank accuracy / exact match over tasks and depths; retention."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | " + " | ".join(f"{n} tokens" for n in lengths) + " | needle kept |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for v in variants:
        cells = []
        for n in lengths:
            rs = [r for r in rows if r["variant"] == v and r["length"] == n]
            rank, exact = (sum(r[k] for r in rs) / len(rs) for k in ("rank_acc", "exact"))
            cells.append(f"{rank:.2f} / {exact:.2f}")
        kept = [r["retention"] for r in rows if r["variant"] == v and r["retention"] is not None]
        cells.append(f"{sum(kept) / len(kept):.2f}" if kept else "-")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/lc-small")
    p.add_argument("--tasks", default="passkey,niah_single")
    p.add_argument("--lengths", default="256,512,1024")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--policies", default="window,sink,h2o,tova")
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--out", default="docs/results/longctx")
    p.add_argument("--check", action="store_true", help="rebuild summary.md from the saved rows; exit 1 if stale")
    args = p.parse_args()
    out = Path(args.out)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.check:
        saved = json.loads((out / "results.json").read_text())
        want = summary(saved["rows"], saved["lengths"])
        if (out / "summary.md").read_text() != want:
            print(f"{out / 'summary.md'} is stale: rerun without --check", file=sys.stderr)
            return 1
        return 0

    import torch
    import transformers

    from msrnn.evaluate.longctx import LongCtxConfig, evaluate_longctx
    from msrnn.evaluate.plots import plot_needle_heatmap
    from msrnn.io import write_json
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import load_lm
    from msrnn.tasks.longctx import LongCtxGenerator
    from msrnn.tasks.noise import noise_sentences

    full = load_lm(args.model)
    haystack = noise_sentences("stdlib", "test")
    tasks = args.tasks.split(",")
    depths = [float(x) for x in args.depths.split(",")]
    cfg = LongCtxConfig(samples=args.samples, chunk_size=256)
    variants = {"full": full, **{f"{p}@{args.budget}": apply_kv(full, KVSettings(p, args.budget))
                                 for p in args.policies.split(",")}}
    rows = []
    for name, lm in variants.items():
        mine = []
        for t in tasks:
            got = evaluate_longctx(lm, LongCtxGenerator(t, full.tokenizer, haystack), lengths, depths, cfg,
                                   progress=True)
            mine += [{**r, "variant": name} for r in got]
            plot_needle_heatmap(got, out / name.replace("@", "_") / f"heatmap_{t}.png", title=f"{t}: {name}")
        write_json(out / name.replace("@", "_") / "results.json", {"variant": name, "rows": mine})
        rows += mine
        print(f"{name}: done", file=sys.stderr)
    write_json(out / "results.json", {"model": args.model, "tasks": tasks, "lengths": lengths, "depths": depths,
                                      "samples": args.samples, "budget": args.budget, "rows": rows,
                                      "torch": torch.__version__, "transformers": transformers.__version__,
                                      "command": "python " + " ".join(sys.argv)})
    (out / "summary.md").write_text(summary(rows, lengths))
    print(summary(rows, lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
