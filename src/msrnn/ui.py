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
MAIN_PROCESS = int(os.environ.get("RANK", "0")) == 0
# Piped to a file or a log, rich would cut tables at 80 columns (wide ones lose every figure); give them room unless
# the terminal or $COLUMNS says otherwise.
out_console = Console(quiet=not MAIN_PROCESS,
                      width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)


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
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
