"""Peak memory of `msrnn convert supra` against the checkpoint's size, before (load the model, build a float32 SUPRA
model, copy, cast) and now (stream the folder's tensors into a SUPRA model built in the checkpoint's dtype).

Usage: python benchmarks/convert_memory.py [--shape qwen2.5-0.5b] [--vocab 32000] [--before-src DIR] [--out DIR]
[--json]

Each conversion (and its save) runs in its own interpreter (msrnn.bench.timing.peak_rss_mib: the high-water mark of
resident memory, reset after the imports); that peak growth is divided by the checkpoint's bytes on disk. Measured
on CPU. "before" is an older checkout's own code, given with --before-src (docs/results/convert_memory used a
worktree of 2533f97: `git worktree add /tmp/old 2533f97`, then `--before-src /tmp/old/src`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

SETUP = """
from msrnn.models.loading import load_hf_causal_lm
from msrnn.supra import convert
"""

# What `msrnn convert supra` did up to 2533f97 (run from that checkout's src with --before-src): load the model,
# convert it whole.
BEFORE = """
convert(load_hf_causal_lm({src!r})).save_pretrained({out!r})
"""

STREAMED = """
from msrnn.supra.convert import convert_dir
supra = convert_dir({src!r})
assert supra is not None
supra.save_pretrained({out!r})
"""


def _commit(src: str | None) -> str | None:
    """The git commit an older checkout's ``src`` folder is at (what "before" measured)."""
    import subprocess

    if src is None:
        return None
    out = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--before-src", default=None,
                    help="the src folder of an older msrnn checkout to measure as 'before' (e.g. a git worktree of "
                         "2533f97)")
    ap.add_argument("--out", default=None, help="write results.json here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    from msrnn.bench.timing import peak_rss_mib
    from msrnn.models.presets import build_model

    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "base"
        build_model(args.shape, args.vocab).to(torch.bfloat16).save_pretrained(src)
        ckpt = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        rows = []
        runs = [("before", BEFORE, args.before_src)] if args.before_src else []
        for mode, code, path in runs + [("streamed", STREAMED, None)]:
            mib = peak_rss_mib(code.format(src=str(src), out=str(Path(tmp) / mode)), setup=SETUP, pythonpath=path)
            rows.append({"mode": mode, "peak_mib": round(mib, 1), "x_checkpoint": round(mib * 2**20 / ckpt, 2)})
    result = {"bench": "convert-memory", "shape": args.shape, "vocab": args.vocab, "dtype": "bfloat16",
              "checkpoint_mib": round(ckpt / 2**20, 1), "rows": rows,
              "command": f"python benchmarks/convert_memory.py --shape {args.shape} --vocab {args.vocab}"
                         + (" --before-src DIR" if args.before_src else ""), "before_commit": _commit(args.before_src)}
    from msrnn.provenance import provenance

    result["provenance"] = {**provenance(), "load_at_start": [round(x, 2) for x in load_start],
                            "command": " ".join(["python", "benchmarks/convert_memory.py", *sys.argv[1:]])}
    if args.out:
        from msrnn.io import write_json

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "results.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"checkpoint {result['checkpoint_mib']} MiB ({args.shape}, vocab {args.vocab}, bf16)")
        for r in rows:
            print(f"  {r['mode']:9s} peak {r['peak_mib']:9.1f} MiB = {r['x_checkpoint']:.2f}x the checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
