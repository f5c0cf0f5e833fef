"""Timing and memory helpers shared by the benchmarks (medians of repeated runs, peak RSS in a fresh process)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], rounds: int) -> float:
    """Median seconds of ``rounds`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib(code: str, timeout: float = 600) -> float:
    """Peak RSS growth (MiB) of a fresh Python process while it runs ``code``, after importing torch.

    Linux: the high-water mark is reset (``/proc/self/clear_refs`` 5) after the imports and read back from
    VmHWM, so the imports' own transient peak cannot hide a smaller workload."""
    script = (
        "import json, torch\n"
        "torch.set_num_threads(1)\n"
        "import msrnn.bst.layers\n"
        "def rss(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key):\n"
        "            return int(line.split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = rss('VmRSS:')\n"
        f"{code}\n"
        "print(json.dumps([base, rss('VmHWM:')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=True)
    base, peak = json.loads(out.stdout.strip().splitlines()[-1])
    return (peak - base) / 1024
