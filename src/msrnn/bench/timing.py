"""Timing and memory helpers shared by the benchmarks and commands: one clock (``timed``: a CUDA sync around the
call), medians of repeated runs and timed decode steps (both with warm-up), and the RSS readings (now, this
process's peak, and the peak of a fresh process running some code)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

DECODE_WARMUP = 2  # untimed decode steps before each timed round


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work (a GPU's kernels run asynchronously: the clock must not stop before they finish)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str | None = "cpu") -> float:
    """Seconds of one call of ``fn``, synchronised before and after on a CUDA ``device``: the one clock every
    benchmark reads (interleaved rounds call it once per variant and round)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], rounds: int, device: torch.device | str | None = "cpu") -> float:
    """Median seconds of ``rounds`` calls after one warm-up call (synchronised on a CUDA ``device``)."""
    fn()
    return statistics.median(timed(fn, device) for _ in range(rounds))


@torch.inference_mode()
def timed_decode(lm: Any, state: Any, steps: int, vocab: int) -> tuple[float, Any]:
    """Seconds for ``steps`` single-token steps of the state's whole batch (after ``DECODE_WARMUP`` untimed ones,
    synchronised on a GPU), and the state after them. Every decode benchmark times through this."""
    batch = getattr(state, "batch_size", 1)
    tok = torch.zeros(batch, 1, dtype=torch.long)
    for _ in range(DECODE_WARMUP):
        _, state = lm.forward_chunk(tok, state)
    device = getattr(lm, "device", None)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        tok.fill_(i % vocab)
        _, state = lm.forward_chunk(tok, state)
    sync(device)
    return time.perf_counter() - t0, state


def rss_mib() -> float:
    """This process's resident set size now, in MiB (Linux /proc; 0 where unavailable)."""
    import os

    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def own_peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``getrusage``; kilobytes on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def peak_rss_mib(code: str, timeout: float = 600, setup: str = "", pythonpath: str | None = None) -> float:
    """Peak RSS growth (MiB) of a fresh Python process while it runs ``code``, after importing torch and running
    ``setup`` (imports, inputs: not counted); ``pythonpath`` runs it against another checkout's ``src``.

    Linux: the high-water mark is reset (``/proc/self/clear_refs`` 5) after the imports and read back from
    VmHWM, so the imports' own transient peak cannot hide a smaller workload. (``ru_maxrss`` would not do: it
    counts the parent's pages the child held between fork and exec.)"""
    script = (
        "import json, torch\n"
        "torch.set_num_threads(1)\n"
        "import msrnn.bst.layers\n"
        f"{setup}\n"
        "def rss(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key):\n"
        "            return int(line.split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = rss('VmRSS:')\n"
        f"{code}\n"
        "print(json.dumps([base, rss('VmHWM:')]))\n"
    )
    import os

    env = None if pythonpath is None else {**os.environ, "PYTHONPATH": pythonpath}  # another msrnn (a "before")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=True,
                         env=env)
    base, peak = json.loads(out.stdout.strip().splitlines()[-1])
    return (peak - base) / 1024
