"""Batched lm-eval scoring against one request at a time, side by side, on standard-library documents.

Times :meth:`msrnn.harness.MsrnnHarnessLM` log-likelihood scoring (what ``loglikelihood_rolling`` and
``loglikelihood`` requests run) with ``batch_size`` 1 and N in interleaved rounds, and checks the scores agree.

    python benchmarks/harness_batch.py --model runs/small --batch-sizes 1,8 [--policy tova --budget 128]

Needs lm-eval (``pip install 'msrnn[harness]'``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--docs", type=int, default=48, help="standard-library modules scored")
    p.add_argument("--chars", type=int, default=2000, help="characters per document (the start of each file)")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--policy", default=None)
    p.add_argument("--budget", type=int, default=None)
    args = p.parse_args()

    from msrnn.harness import MsrnnHarnessLM

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    kv = {"policy": args.policy, "budget": args.budget} if args.policy else {}
    h = MsrnnHarnessLM(args.model, chunk_size=args.chunk_size, **kv)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[: args.docs]
    rows = [h._prefix() + h._encode(f.read_text(errors="ignore")[: args.chars]) for f in files]
    times: dict[int, list[float]] = {b: [] for b in sizes}
    scores: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for b in sizes:
            h.batch_size = b
            t0 = time.perf_counter()
            scored = h._score(rows)
            times[b].append(time.perf_counter() - t0)
            scores[b] = [float(lp.sum()) for lp, _ in scored]
    tokens = sum(len(r) for r in rows)
    base = sizes[0]
    result = {"model": args.model, "kv": kv or None, "docs": len(rows), "tokens": tokens,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "rows": []}
    for b in sizes:
        sec = statistics.median(times[b])
        diff = max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(scores[b], scores[base], strict=True))
        result["rows"].append({"batch_size": b, "seconds": sec, "tok/s": tokens / sec,
                               f"speed vs batch {base}": statistics.median(times[base]) / sec,
                               "max relative score difference": diff})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
