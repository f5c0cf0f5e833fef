"""Shared CLI plumbing: the conventions every command keeps and the error boundary."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from msrnn.errors import ConfigError


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (nan and inf are floats too, and every comparison with nan is False)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
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


def seed_int(text: str) -> int:
    """A seed every RNG msrnn seeds takes (torch, NumPy, Python): 0 <= seed < 2**32."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {v}")
    return v


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if kind == "mps" and torch.backends.mps.is_available():
        return name
    if kind not in ("cpu", "cuda"):  # meta holds no data; xla/mps/... are untested here
        raise ConfigError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
    return name


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse an unusable ``--plot`` (a file) or ``--out`` (a folder) before a command runs, not after an hour of
    work: a folder where a file goes, a file where a folder goes, or a parent that is a file or not writable."""
    import os
    from pathlib import Path

    for attr, want_dir in (("plot", False), ("out", True), ("output_path", False), ("lm_eval_dir", True)):
        value = getattr(args, attr, None)
        flag = attr.replace("_", "-")
        if not value:
            continue
        path = Path(value).expanduser()
        if path.exists() and path.is_dir() != want_dir:
            kind = "a folder" if path.is_dir() else "a file"
            raise ConfigError(f"--{flag} {value} is {kind}; name {'a folder' if want_dir else 'a file'} there")
        parent = path if path.exists() else path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"--{flag} {value} is under {parent}, which is a file; choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--{flag} {value}: {parent} is not writable; choose another path")
        if want_dir and path.is_dir():
            check_no_links_out(path, f"--{flag}")


def check_no_links_out(root: Path, flag: str) -> None:
    """Refuse an output folder holding a link to outside it: msrnn's writes rename files into place (a linked file
    is replaced, never written through), but a linked folder (``checkpoints`` -> elsewhere) would take every write
    made inside it out of --out."""
    import os

    top = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked folders
        for name in dirnames + filenames:
            link = Path(dirpath) / name
            if link.is_symlink() and (link.is_dir() or name in dirnames):
                target = link.resolve()
                if target != top and top not in target.parents:
                    raise ConfigError(f"{flag} {root} holds {link}, a link to {target} outside it; msrnn never "
                                      "writes through links: replace the link with a real folder")


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


def save_results(out: str | None, name: str, obj) -> str | None:
    """Write ``obj`` as JSON to ``out/name`` (atomically, with its provenance) when ``--out`` was given; returns the
    path or None."""
    if not out:
        return None
    from pathlib import Path

    from msrnn.io import write_json
    from msrnn.provenance import stamped

    path = Path(out) / name
    write_json(path, stamped(obj))
    return str(path)
