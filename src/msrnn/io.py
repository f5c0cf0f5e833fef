"""Crash-safe file output and the user cache directory.

Nothing msrnn writes is ever half-written: files go to a temporary sibling and are renamed into place, and
directories (checkpoints, model folders) are built in a temporary sibling directory and renamed as a whole.
What lands keeps the user's umask (0644 files and 0755 folders under the usual 022), not the 0600/0700 that
``mkstemp``/``mkdtemp`` give their private temporaries, so a shared model folder stays readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    """Give a finished temporary the mode a plain ``open``/``mkdir`` would have given it."""
    mask = _umask()
    if is_dir:
        for root, _dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                fp = os.path.join(root, f)
                if not os.path.islink(fp):
                    os.chmod(fp, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def cache_dir() -> Path:
    """Where msrnn caches tokenizers, token streams and trained models.

    ``$MSRNN_CACHE`` wins, then ``$XDG_CACHE_HOME/msrnn``, then ``~/.cache/msrnn``.
    """
    if os.environ.get("MSRNN_CACHE"):
        return Path(os.environ["MSRNN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "msrnn"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _publish_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=json_form)
        fh.write("\n")


def json_form(obj: Any) -> Any:
    """The JSON form of an object that defines one (``to_json``: typed benchmark rows); anything else is refused,
    as ``json`` would."""
    to_json = getattr(obj, "to_json", None)
    if callable(to_json):
        return to_json()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory that becomes ``path`` when the block succeeds.

    With ``overwrite`` an existing ``path`` is replaced only after the new one is complete, so a crash at any
    point leaves either the old directory or the new one, never a mix. What a killed writer left behind for this
    ``path`` is tidied first: its temporaries are deleted, and an old copy set aside just before the kill is put
    back if the new one never landed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _tidy_after_kill(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, is_dir=True)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tidy_after_kill(path: Path) -> None:
    old = path.with_name(f".{path.name}.old")
    if old.exists() or old.is_symlink():
        if path.exists():
            _remove(old)
        else:  # killed between setting the old copy aside and renaming the new one in: the old one is the data
            os.replace(old, path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a file, link or folder at ``path`` if there is one (``shutil.rmtree`` alone skips files)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def save_figure(fig: Any, out: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
    return out
