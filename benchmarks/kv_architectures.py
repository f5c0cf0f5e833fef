"""The README's supported-architectures table: every causal-LM type of the installed transformers, verified or
refused by msrnn.kv.verify (the same sweep tests/test_kv_verify.py runs).

    python benchmarks/kv_architectures.py --out docs/results/kv_architectures

writes ``results.json`` and ``table.md`` (a summary and one row per model type) into --out.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch
    import transformers

    from msrnn import __version__
    from msrnn.io import write_json
    from msrnn.kv.verify import causal_lm_types, check_architecture

    transformers.logging.set_verbosity_error()
    start = time.time()
    rows = [asdict(check_architecture(t)) for t in causal_lm_types()]
    versions = {"msrnn": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    out = Path(args.out)
    write_json(out / "results.json", {"versions": versions, "seconds": round(time.time() - start, 1), "rows": rows})
    counts = Counter(r["outcome"] for r in rows)
    lines = [f"Every causal-LM type of transformers {versions['transformers']} (torch {versions['torch']}, msrnn "
             f"{versions['msrnn']}), built tiny from its default config and verified by `msrnn.kv.verify`: "
             f"**{counts['verified']} verified, {counts['refused']} refused with a named reason, "
             f"{counts['not built']} whose default config cannot be built tiny**. Made by "
             "`python benchmarks/kv_architectures.py --out docs/results/kv_architectures`.", "",
             "| model type | class | KV eviction | rolling positions / reason |", "|---|---|---|---|"]
    for r in rows:
        detail = r["rolling"] if r["outcome"] == "verified" else r["reason"]
        detail = detail.replace("|", "/")
        lines.append(f"| {r['model_type']} | {r['model_class']} | {r['outcome']} | {detail} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:1]))


if __name__ == "__main__":
    main()
