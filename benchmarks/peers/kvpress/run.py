"""msrnn next to NVIDIA kvpress on the same weights: kept tokens, prefill and hard-budget decode, and a
reproduction of what kvpress's bounded StreamingLLM holds. Run from msrnn's environment:

    python -m venv .kvpress-venv && .kvpress-venv/bin/pip install torch==2.13.0 && \\
        .kvpress-venv/bin/pip install -r benchmarks/peers/kvpress/requirements.txt
    python benchmarks/peers/kvpress/run.py --kvpress-python .kvpress-venv/bin/python \\
        --out docs/results/peers_kvpress

It writes random ``small``-shaped weights once, then runs each side in its own process (kvpress needs
transformers < 5.3, msrnn >= 5.4), alternating ``--repeats`` times; each process times its variants in
interleaved rounds, one thread. Speeds are reported as ratios to each library's own full cache in the same
process, which is the comparison that survives two transformers versions and a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def side(python: str, script: str, weights: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [python, str(HERE / script), str(weights), str(out), "--tokens", args.tokens, "--budget",
           str(args.budget), "--steps", str(args.steps), "--rounds", str(args.rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{script} failed:\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


def agreement(a: list, b: list) -> tuple[int, int]:
    """(layer-heads whose kept sets are equal, layer-heads)."""
    pairs = [(sorted(x), sorted(y)) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True)]
    return sum(x == y for x, y in pairs), len(pairs)


def streaming_rows(rep: dict, cache_order: bool) -> dict:
    """How far a bounded StreamingLLM's held positions are from StreamingLLM's definition after the last step."""
    T, k, s, n = rep["tokens"], rep["budget"], rep["sinks"], rep["steps"]
    want = set(range(s)) | set(range(T + n - (k - s), T + n))
    held = set(rep["held"][-1])
    row = {"held after the last step": f"old positions {sorted(held - want)[:6]}..." if held - want
           else "the sinks and the newest", "positions wrongly held": len(held - want),
           "newest positions missing": len(want - held)}
    if cache_order:  # kvpress's cache order is what its StreamingLLM score reads (msrnn keeps positions per slot)
        row["cache in time order after every step"] = all(h == sorted(h) for h in rep["held"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvpress-python", required=True, help="the python of a venv with requirements.txt installed")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="processes per side, alternating")
    args = ap.parse_args()
    from common import make_weights

    from msrnn.provenance import provenance

    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        make_weights(weights)
        runs: dict[str, list[dict]] = {"msrnn": [], "kvpress": []}
        for r in range(args.repeats):
            runs["msrnn"].append(side(sys.executable, "msrnn_side.py", weights, Path(tmp) / f"m{r}.json", args))
            runs["kvpress"].append(side(args.kvpress_python, "kvpress_side.py", weights, Path(tmp) / f"k{r}.json",
                                        args))
    m0, k0 = runs["msrnn"][0], runs["kvpress"][0]

    def med(lib: str, T: str, name: str) -> float:
        return statistics.median(run["lengths"][T]["seconds"][name] for run in runs[lib])

    rows = []
    for T in m0["lengths"]:
        tova = agreement(m0["lengths"][T]["kept"]["tova"], k0["lengths"][T]["kept"]["tova"])
        sllm = agreement(m0["lengths"][T]["kept"]["streaming_llm"], k0["lengths"][T]["kept"]["streaming_llm"])
        rows.append({
            "tokens": int(T), "budget": args.budget,
            "TOVA kept sets equal (layer x KV head)": f"{tova[0]}/{tova[1]}",
            "StreamingLLM kept sets equal": f"{sllm[0]}/{sllm[1]}",
            "msrnn prefill oneshot vs own full": med("msrnn", T, "prefill full") / med("msrnn", T, "prefill tova"),
            "msrnn prefill exact vs own full": med("msrnn", T, "prefill full") / med("msrnn", T, "prefill tova exact"),
            "kvpress prefill vs own full": med("kvpress", T, "prefill full") / med("kvpress", T, "prefill tova"),
            "msrnn hard-budget decode vs own full": med("msrnn", T, "decode full")
            / med("msrnn", T, "decode tova hard budget"),
            "kvpress hard-budget decode vs own full": med("kvpress", T, "decode full")
            / med("kvpress", T, "decode tova hard budget"),
            "msrnn full decode tok/s": args.steps / med("msrnn", T, "decode full"),
            "kvpress full decode tok/s": args.steps / med("kvpress", T, "decode full"),
        })
    result = {"rows": rows,
              "streaming_llm": [{"library": "msrnn (sink, 4 sinks)",
                                 **streaming_rows(m0["streaming_reproduction"], False)},
                                {"library": "kvpress (DecodingPress over StreamingLLMPress)",
                                 **streaming_rows(k0["streaming_reproduction"], True)}],
              "streaming_llm_held": {"msrnn": m0["streaming_reproduction"]["held"][-1],
                                     "kvpress": k0["streaming_reproduction"]["held"][-1]},
              "sides": {lib: {k: v for k, v in run[0].items() if k in ("library", "torch", "transformers")}
                        for lib, run in runs.items()},
              "settings": {"tokens": args.tokens, "budget": args.budget, "steps": args.steps, "rounds": args.rounds,
                           "repeats": args.repeats, "threads": 1},
              "provenance": provenance()}
    result["provenance"].update(command=" ".join(["python", "benchmarks/peers/kvpress/run.py", *sys.argv[1:]]),
                                load_at_start=load_start, threads=1)
    from msrnn.io import write_json

    write_json(args.out / "results.json", result)  # atomic, and a link at the path is replaced, not followed
    for row in rows:
        print(json.dumps(row))
    for row in result["streaming_llm"]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
