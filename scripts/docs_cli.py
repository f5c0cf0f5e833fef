"""Write the CLI reference (docs/reference/cli.md) from msrnn's own argparse parsers, so it cannot drift.

    python scripts/docs_cli.py            # write it
    python scripts/docs_cli.py --check    # exit 1 if the saved page differs from the parsers (CI)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "reference" / "cli.md"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _section(name: str, parser: argparse.ArgumentParser, depth: int) -> list[str]:
    subs = _subcommands(parser)
    lines = [f"{'#' * min(depth, 4)} `{name}`", ""]
    if parser.description:
        lines += [_cell(parser.description), ""]
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
            continue
        flags = ", ".join(f"`{f}`" for f in a.option_strings) or f"`{a.dest}`"
        default = "" if a.default in (None, argparse.SUPPRESS) or isinstance(a, argparse._StoreTrueAction) \
            else f"`{a.default}`"
        choices = f" (one of {', '.join(map(str, a.choices))})" if a.choices else ""
        rows.append(f"| {flags} | {_cell((a.help or '') + choices)} | {default} |")
    if rows:
        lines += ["| option | meaning | default |", "|---|---|---|", *rows, ""]
    for sub, p in subs:
        lines += _section(f"{name} {sub}", p, depth + 1)
    return lines


def render() -> str:
    from msrnn.cli.main import build_parser

    root = build_parser()
    lines = ["# CLI reference", "", "Generated from the parsers by `python scripts/docs_cli.py`; every command also "
             "has `--help`.", ""]
    for sub, p in _subcommands(root):
        lines += _section(f"msrnn {sub}", p, 2)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    from generated import write_or_check

    return write_or_check(__doc__, OUT, render)


if __name__ == "__main__":
    sys.exit(main())
