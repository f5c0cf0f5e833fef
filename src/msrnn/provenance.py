"""Where a saved result came from: the command that made it, the versions, the machine and its load.

Every ``results.json`` a command writes carries this under ``"provenance"``, and the docs' results pages print it
next to the figures (``scripts/docs_results.py``), so a figure is never separated from how it was measured. The
CLI records the command line and the load average when a command starts (:func:`start`); the load is read again
when the result is written, since a benchmark's ratios only mean something next to what else was running.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
from typing import Any

_STARTED: dict[str, Any] = {}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not every platform has a load average
        return None


def start(argv: list[str]) -> None:
    """Record the command (``msrnn`` plus ``argv``) and the load when it started; called once by the CLI."""
    _STARTED.clear()
    _STARTED.update(command=shlex.join(["msrnn", *argv]), load_at_start=_load())


def provenance() -> dict[str, Any]:
    """The command, versions (msrnn, torch, transformers, Python), threads, device, CPU count, load average (1, 5
    and 15 minutes) at the start and now, and the UTC time now."""
    import torch
    import transformers

    from msrnn.version import __version__

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return {"command": _STARTED.get("command", "(called from Python, not the CLI)"), "msrnn": __version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "device": device,
            "cpus": os.cpu_count(), "load_at_start": _STARTED.get("load_at_start"), "load_at_end": _load(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def stamped(result: Any) -> Any:
    """``result`` with its provenance added (a dict gains a ``provenance`` key; anything else is left as it is)."""
    if isinstance(result, dict) and "provenance" not in result:
        return {**result, "provenance": provenance()}
    return result
