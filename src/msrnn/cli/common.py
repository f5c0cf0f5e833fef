"""Shared CLI plumbing: the conventions every command keeps and the error boundary."""

from __future__ import annotations

import argparse
import logging

from msrnn.errors import ConfigError


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def int_list(text: str, flag: str) -> list[int]:
    """A comma-separated list of positive integers (``--segments 1,2,4``), or one clear error naming ``flag``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} needs positive integers, e.g. 1,2,4,8")
    return values


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
    return name


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from msrnn.ui import err_console

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)], force=True)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def emit(args: argparse.Namespace, title: str, result: dict) -> int:
    """Print a command's result: one JSON object with --json, otherwise a two-column rich table."""
    from msrnn.ui import out_console, print_json, table

    if getattr(args, "json", False):
        print_json(result)
    else:
        out_console.print(table(title, ["field", "value"], list(result.items())))
    return 0
