"""Text corpora: the embedded stdlib source, a user's files, or a ``datasets`` corpus.

Data is named by a spec string (the CLI's ``--data``):

* ``stdlib[:split]`` -- the running interpreter's standard-library ``.py`` files (present on every machine).
  Test suites (``test/``, ``tests/``, ``idle_test/``) and ``site-packages`` are left out: the former are
  repetitive and larger than the rest of the stdlib, the latter are not the standard library.
* ``PATH[:split]`` -- a text file, a folder (all files below it, recursively) or a glob. A path is used whole
  unless a split is named (``notes.txt`` is all of notes.txt, for evaluation and training alike).
* ``hf:NAME[:split]`` -- a Hugging Face dataset (a Hub name or a local folder of data files) with a ``text``
  column (needs the ``hf`` extra). Read in datasets' streaming mode: training tokenizes it into the on-disk token
  cache as it streams, so it is never held in memory whole.

Splits (``train``, ``val``, ``test``, ``all``) of ``stdlib`` and of a path given with a split are assigned per
file by a hash of its relative path, so they are stable across machines and runs and never overlap.
Documents are files, or (``unit="folder"``) all files of one folder that fall in the split, concatenated in
sorted order, like the BST paper's GitHub set: that gives held-out code documents of 10k-100k+ tokens.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import logging
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from msrnn.errors import DataError, one_line

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
SPLIT_FRACTIONS = {"train": 0.90, "val": 0.05, "test": 0.05}
_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One unit of text: ``name`` is its relative path (file) or folder."""

    name: str
    text: str


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` string."""

    source: str  # "stdlib" | "path" | "hf"
    name: str  # path or dataset name ("" for stdlib)
    split: str = "all"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise DataError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}")

    @property
    def label(self) -> str:
        """The spec as the user wrote it (for messages)."""
        base = {"stdlib": "stdlib", "path": self.name, "hf": f"hf:{self.name}"}[self.source]
        return f"{base}:{self.split}"


def parse_data_spec(spec: str, default_split: str = "all") -> DataSpec:
    """Parse ``stdlib:test``, ``hf:pg19:test``, ``some/dir``, ``notes.txt:val`` ...

    ``default_split`` applies to ``stdlib`` and ``hf:`` specs only: a file or folder the user names is used
    whole (split ``all``) unless the spec names a split, since hashing one file into 5% splits leaves nothing."""
    if not spec or not spec.strip():
        raise DataError("empty data spec; use e.g. --data stdlib:test or --data path/to/texts")
    spec = spec.strip()
    if spec == "stdlib" or spec.startswith("stdlib:"):
        split = spec.split(":", 1)[1] if ":" in spec else default_split
        return DataSpec("stdlib", "", split)
    if spec.startswith("hf:"):
        rest = spec[3:]
        name, _, split = rest.partition(":")
        if not name:
            raise DataError("hf: needs a dataset name, e.g. --data hf:pg19:test")
        return DataSpec("hf", name, split or default_split)
    head, sep, tail = spec.rpartition(":")
    if sep and tail in SPLITS and head:
        return DataSpec("path", head, tail)
    return DataSpec("path", spec, "all")


def training_specs(spec: str | DataSpec) -> tuple[DataSpec, DataSpec | None]:
    """The (train, validation) specs a training command reads from ``spec``.

    ``stdlib``, ``hf:`` and a path with a split train on the ``train`` split and validate on ``val``; a path
    named without a split (or with ``:all``) trains on all of it, with no validation split."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.source == "path" and spec.split == "all":
        return spec, None
    return DataSpec(spec.source, spec.name, "train"), DataSpec(spec.source, spec.name, "val")


def split_of(relpath: str) -> str:
    """The split a file belongs to, from a hash of its relative path (stable, ~90/5/5)."""
    h = int.from_bytes(hashlib.sha1(relpath.replace("\\", "/").encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, frac in SPLIT_FRACTIONS.items():
        edge += frac
        if h < edge:
            return name
    return "train"


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (the offline corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = stdlib_root()
    files = [
        p for p in root.rglob("*.py")
        if not (_STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    ]
    return root, sorted(files)


def _path_files(name: str) -> tuple[Path, list[Path]]:
    path = Path(name).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
        return path, files
    matches = sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
    if matches:
        root = Path(globlib.escape(str(path))).parent
        while any(ch in str(root) for ch in "*?[") and root != root.parent:
            root = root.parent
        return root, matches
    raise DataError(f"data path {name} does not exist; pass a file, a folder or a glob of text files")


def _read_files(root: Path, files: list[Path], split: str) -> list[tuple[str, str]]:
    out, skipped = [], 0
    for f in files:
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        if split != "all" and split_of(rel) != split:
            continue
        try:
            text = f.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if text.strip():
            out.append((rel, text))
    if skipped:
        log.warning("skipped %d file(s) that are not valid UTF-8 text", skipped)
    return out


def _group_folders(items: list[tuple[str, str]]) -> list[Document]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for rel, text in items:
        folder = rel.rpartition("/")[0] or "."
        groups.setdefault(folder, []).append((rel, text))
    docs = []
    for folder in sorted(groups):
        parts = sorted(groups[folder])
        docs.append(Document(folder + "/", "\n".join(text for _, text in parts)))
    return docs


def _hf_stream(spec: DataSpec) -> tuple[str, Iterator[Document]]:
    """A ``datasets`` corpus in streaming mode: (a key for the data, its documents one at a time). The key is
    datasets' own hash of what the builder reads (the revision of a Hub dataset, the files and their times of a
    local one), so a changed dataset gets a new key."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {spec.label} needs the 'datasets' package; pip install 'msrnn[hf]'") from None
    split = {"all": "train", "val": "validation"}.get(spec.split, spec.split)
    try:
        builder = datasets.load_dataset_builder(spec.name)
        ds = builder.as_streaming_dataset(split=split)
    except Exception as exc:
        raise DataError(f"cannot load dataset {spec.name!r} split {split!r}: {one_line(exc)}") from None
    key = hashlib.sha1("\0".join(["hf", spec.name, str(builder.config.name), split, str(builder.hash)]).encode())

    def documents() -> Iterator[Document]:
        for i, row in enumerate(ds):
            if "text" not in row:
                raise DataError(f"dataset {spec.name} has no 'text' column (columns: {', '.join(row)})")
            text = row["text"]
            if text and text.strip():
                yield Document(f"{spec.name}/{i}", text)

    return key.hexdigest()[:16], documents()


def document_stream(spec: str | DataSpec) -> tuple[str, Iterator[Document]]:
    """(a key naming the data, its documents one at a time), for what reads a corpus once (tokenizing, training a
    tokenizer). ``hf:`` streams, so a corpus larger than memory never is in memory; files are read whole and keyed
    by :func:`fingerprint`."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.source == "hf":
        return _hf_stream(spec)
    docs = load_documents(spec)
    return fingerprint(docs), iter(docs)


def load_documents(spec: str | DataSpec, unit: str = "file", default_split: str = "all") -> list[Document]:
    """The documents a spec names, in a deterministic order. Raises :class:`DataError` if there are none."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec, default_split)
    if unit not in ("file", "folder"):
        raise DataError(f"unknown document unit {unit!r}; use 'file' or 'folder'")
    if spec.source == "hf":
        docs = list(_hf_stream(spec)[1])
    else:
        root, files = _stdlib_files() if spec.source == "stdlib" else _path_files(spec.name)
        items = _read_files(root, files, spec.split)
        docs = _group_folders(items) if unit == "folder" else [Document(rel, text) for rel, text in items]
    if not docs:
        raise DataError(f"no documents in {spec.label}; check the path/split (splits are ~90/5/5 of the files)")
    return docs


def fingerprint(docs: list[Document]) -> str:
    """A content hash of documents (order-sensitive), used to key token caches."""
    h = hashlib.sha1()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(d.text.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]
