"""The one write-or-check step of every generated documentation page (``scripts/docs_*.py``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def write_or_check(doc: str, out: Path, render: Callable[[], str]) -> int:
    """``--check``: exit 1 when ``out`` differs from what ``render`` makes (a stale page); otherwise write it."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the saved page is stale (CI)")
    args = p.parse_args()
    text = render()
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run python {Path(sys.argv[0]).as_posix()}", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
