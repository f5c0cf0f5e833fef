"""Typed benchmark rows and the one formatter every ``msrnn bench`` table goes through.

A benchmark returns rows as dataclasses (fields named for what they measure, ratios as properties), so the code
that measures and the code that prints share names checked by Python, not string keys spelled twice. A row's
``to_json`` is its form in result files and ``--json`` (the keys published results have always used); indexing a
row by one of those keys reads that form, for code that reads results either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


class Row:
    """Base of a typed benchmark row."""

    def to_json(self) -> dict[str, Any]:
        """The row as result files and ``--json`` carry it: each field under its own name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()


@dataclasses.dataclass(frozen=True)
class Column:
    """One table column: its header and how a row gives its cell."""

    header: str
    cell: Callable[[Any], Any]


def ratio(x: float | None) -> str:
    """A speed or size ratio as ``1.23x`` (blank when not measured)."""
    return "" if x is None else f"{x:.2f}x"


def percent(x: float | None) -> str:
    """A fraction as ``87%`` (blank when not measured)."""
    return "" if x is None else f"{100 * x:.0f}%"


def dash(x: Any) -> Any:
    """A measurement that was skipped (None) as ``-``."""
    return "-" if x is None else x


def render(title: str, rows: Sequence[Any], columns: Sequence[Column]) -> Any:
    """The rich table of ``rows`` in ``columns``: the one formatter of every benchmark table."""
    from msrnn.ui import table

    return table(title, [c.header for c in columns], [[c.cell(r) for c in columns] for r in rows])


def jsonable(obj: Any) -> Any:
    """``obj`` with every row replaced by its ``to_json`` form (dicts and lists walked)."""
    if isinstance(obj, Row):
        return obj.to_json()
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
