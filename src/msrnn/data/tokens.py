"""Token streams cached on disk as numpy memmaps, keyed by corpus content and tokenizer.

A :class:`TokenStream` is all documents of a split tokenized and concatenated (``tokens``), with document
boundaries in ``offsets`` (``doc i`` is ``tokens[offsets[i]:offsets[i+1]]``). Re-tokenizing the 11 MB stdlib
train split takes tens of seconds on 2 cores; a cache hit takes milliseconds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msrnn.data.corpus import DataSpec, Document, document_stream, fingerprint
from msrnn.data.tokenizer import encode_many, tokenizer_fingerprint
from msrnn.errors import DataError
from msrnn.io import atomic_dir, cache_dir

log = logging.getLogger(__name__)


@dataclass
class TokenStream:
    """A corpus tokenized once into a memory-mapped array, with document offsets."""
    tokens: np.ndarray  # [N] uint16/uint32 (memmap when cached)
    offsets: np.ndarray  # [D + 1] int64
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole stream."""
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        """Document ``i``'s tokens."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_documents(docs: list[Document], tokenizer: Any) -> TokenStream:
    """Tokenize in memory (no cache)."""
    ids = encode_many(tokenizer, [d.text for d in docs])
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for x in ids for t in x), dtype=_dtype_for(len(tokenizer)), count=int(offsets[-1]))
    return TokenStream(flat, offsets, [d.name for d in docs])


def cached_token_stream(docs: list[Document], tokenizer: Any, root: str | Path | None = None) -> TokenStream:
    """Tokenize ``docs`` once and memory-map the result on later calls."""
    if not docs:
        raise DataError("no documents to tokenize; check --data")
    return _cached(fingerprint(docs), iter(docs), tokenizer, root)


def token_stream(spec: str | DataSpec, tokenizer: Any, root: str | Path | None = None) -> TokenStream:
    """The corpus ``spec`` names, tokenized into the cache as it is read (``hf:`` corpora stream: neither their
    text nor their tokens are ever in memory whole) and memory-mapped."""
    key, docs = document_stream(spec)
    return _cached(key, docs, tokenizer, root)


def _cached(key: str, docs: Iterator[Document], tokenizer: Any, root: str | Path | None,
            batch_docs: int = 256) -> TokenStream:
    """Tokenize ``docs`` ``batch_docs`` at a time, appending to the cache file (not read again when the key is
    cached), then memory-map it."""
    folder = Path(root) if root is not None else cache_dir() / "tokens"
    path = folder / f"{key}-{tokenizer_fingerprint(tokenizer)}"
    if not (path / "meta.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        dtype = _dtype_for(len(tokenizer))
        lengths: list[int] = []
        names: list[str] = []
        try:
            with atomic_dir(path) as tmp, open(tmp / "tokens.bin", "wb") as out:
                while batch := list(itertools.islice(docs, batch_docs)):
                    for ids in encode_many(tokenizer, [d.text for d in batch]):
                        np.asarray(ids, dtype=dtype).tofile(out)
                        lengths.append(len(ids))
                    names += [d.name for d in batch]
                if not names:
                    raise DataError("no documents to tokenize; check --data")
                out.flush()
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                np.save(tmp / "offsets.npy", offsets)
                (tmp / "meta.json").write_text(json.dumps(
                    {"dtype": dtype.str, "names": names, "num_tokens": int(offsets[-1])}))
        except FileExistsError:
            pass  # another process cached the same key first; its copy is identical
        log.info("cached %d tokens at %s", sum(lengths), path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        offsets = np.load(path / "offsets.npy")
        size = os.path.getsize(path / "tokens.bin") // np.dtype(meta["dtype"]).itemsize
        if size != meta["num_tokens"] or offsets[-1] != size:
            raise ValueError("length mismatch")
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(size,))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"token cache {path} is corrupt ({exc}); delete that folder and run again") from None
    return TokenStream(tokens, offsets, meta["names"])
