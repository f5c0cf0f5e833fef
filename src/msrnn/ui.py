"""Terminal output: progress and tables on stderr/stdout via rich, machine-readable JSON on stdout."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# Progress and logs go to stderr so `--json` output on stdout stays parseable.
err_console = Console(stderr=True)
# Under a multi-process launcher (torchrun sets RANK) only rank 0 prints results: the others hold the same reduced
# figures, and N copies of a table would read as N runs. Errors and progress still show on every rank.
def _env_int(name: str, default: int) -> int | None:
    """An integer environment variable (None when it is set but not an integer; the CLI refuses that in one line)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        return None


MAIN_PROCESS = _env_int("RANK", 0) in (0, None)
# Piped to a file or a log, rich would cut tables at 80 columns (wide ones lose every figure); give them room unless
# the terminal or $COLUMNS says otherwise.
_COLUMNS = _env_int("COLUMNS", 0)
out_console = Console(quiet=not MAIN_PROCESS,
                      width=_COLUMNS if _COLUMNS and _COLUMNS >= 40 else None if sys.stdout.isatty() else 200)


def check_launch_env() -> None:
    """Refuse launcher variables that cannot be right, before a command runs: a non-integer RANK or WORLD_SIZE, or a
    RANK with no WORLD_SIZE above it (a lone RANK=1 process would print nothing, believing rank 0 prints)."""
    from msrnn.errors import ConfigError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name in os.environ and _env_int(name, 0) is None:
            raise ConfigError(f"{name}={os.environ[name]!r} is not an integer; unset it, or start msrnn with torchrun "
                              "/ accelerate launch, which set it")
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world > 1 and ("RANK" not in os.environ or "MASTER_ADDR" not in os.environ):
        # torch.distributed would wait for the other processes forever
        raise ConfigError(f"WORLD_SIZE={world} without RANK and MASTER_ADDR: no launcher started the other "
                          "processes; unset WORLD_SIZE, or start msrnn with torchrun / accelerate launch")
    if rank and not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} with WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}: this process is not "
                          "part of a launch; unset RANK, or start msrnn with torchrun / accelerate launch")


def fmt(v: Any) -> str:
    """A value as a table cell: thousands separators, floats to 3 decimals (none from 100,000 up)."""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:,.3f}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table with a left-aligned first column."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in (columns[0],) else "right")
    for r in rows:
        t.add_row(*(fmt(v) for v in r))
    return t


def print_json(obj: Any) -> None:
    """One JSON object on stdout (rank 0 only under a multi-process launcher)."""
    if MAIN_PROCESS:
        print(json.dumps(obj, indent=2, default=_default))


def _default(o: Any) -> Any:
    if callable(getattr(o, "to_json", None)):  # typed benchmark rows
        return o.to_json()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
