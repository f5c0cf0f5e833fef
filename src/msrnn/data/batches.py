"""Deterministic language-modelling batches from a token stream.

A batch is a pure function of ``(seed, step, micro_step, rank)``, so training resumed from a checkpoint sees
exactly the batches an uninterrupted run would, and DDP ranks see different data without coordination.

``repeat_fraction`` of each batch are sequences whose second half repeats the first. On a small model this is
what makes induction heads form quickly, i.e. what makes the model actually use distant context (measured in
the foundation issue: held-out stdlib PPL ~14 with repeats versus ~42 without, same compute).

Documents are joined by EOS and windows are cut from that stream, as in standard LM pretraining. What a window
means depends on ``packing``:

* ``documents`` (the default): each document is its own sequence. A batch carries ``position_ids`` that restart
  at 0 where a document starts inside a window, and the first token of such a document is not a target (nothing
  of it can be predicted from the document before). A model that honours restarting positions (a softmax decoder
  masks across them, SUPRA empties its state there) sees every document from a fresh state; for any other model
  :func:`document_rows` lays each document of a window out on a row of its own, which is the same computation.
  A repeat sequence (``repeat_fraction``) is one synthetic document: its copy must see the original.
* ``stream``: the window is one sequence, so attention and recurrent states run across document boundaries (the
  behaviour before packing existed; what most LM pretraining does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from msrnn.data.tokens import TokenStream
from msrnn.errors import ConfigError, DataError

PACKINGS = ("documents", "stream")
IGNORE = -100  # transformers' label for "no loss here"


@dataclass
class LMBatches:
    """Deterministic language-model batches: the batch of a step is a function of the step."""
    stream: TokenStream
    seq_len: int
    batch_size: int
    eos_id: int
    repeat_fraction: float = 0.0
    seed: int = 0
    packing: str = "documents"
    _starts: np.ndarray = field(init=False, repr=False)  # [D] where each document starts in the joined stream
    _total: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.repeat_fraction <= 1.0:
            raise ConfigError(f"repeat_fraction must be in [0, 1], got {self.repeat_fraction}")
        if self.packing not in PACKINGS:
            raise ConfigError(f"unknown packing {self.packing!r}; use one of {', '.join(PACKINGS)}")
        # Documents joined by EOS so a window may cross a boundary, as in standard LM pretraining. The joined stream
        # is never built: a window is read from the token file (a memory map, shared by every rank) document by
        # document, so a rank holds the windows it reads, not the corpus (as int64 it was 4x the token file).
        offsets = np.asarray(self.stream.offsets, dtype=np.int64)
        self._starts = offsets[:-1] + np.arange(len(offsets) - 1)
        self._total = int(offsets[-1]) + max(len(offsets) - 2, 0)
        if self._total <= self.seq_len:
            raise DataError(
                f"the training data has {self._total} tokens, fewer than one sequence of {self.seq_len}; "
                "use more data or a smaller --seq-len"
            )

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one batch (batch size x sequence length)."""
        return self.seq_len * self.batch_size

    def _start(self, rng: np.random.Generator, length: int) -> int:
        """Where a random window of ``length`` positions starts in the joined stream."""
        return int(rng.integers(0, self._total - length + 1))

    def positions(self, start: int, end: int) -> np.ndarray:
        """For positions [start, end) of the joined stream, each one's distance from where its document starts or
        from ``start``, whichever is later (a document's EOS belongs to it), as int64."""
        idx = np.arange(start, end, dtype=np.int64)
        doc = np.searchsorted(self._starts, idx, side="right") - 1  # [end - start] the document of each position
        return idx - np.maximum(self._starts[doc], start)

    def joined(self, start: int, end: int) -> np.ndarray:
        """Positions [start, end) of the documents joined by EOS, as int64 (read from the token file)."""
        tokens, offsets = self.stream.tokens, self.stream.offsets
        last = len(offsets) - 2  # the last document has no EOS after it
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, pos = [], start
        while pos < end:
            doc_end = int(self._starts[i]) + int(offsets[i + 1] - offsets[i])  # where document i's EOS goes
            if pos < doc_end:
                take = min(end, doc_end)
                a = int(offsets[i]) + pos - int(self._starts[i])
                parts.append(np.asarray(tokens[a : a + take - pos], dtype=np.int64))
                pos = take
            if pos < end and pos == doc_end and i < last:
                parts.append(np.array([self.eos_id], dtype=np.int64))
                pos += 1
            i += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def batch(self, step: int, micro_step: int = 0, rank: int = 0) -> dict[str, torch.Tensor]:
        """The batch of (step, micro-step, rank): a pure function of its arguments."""
        rng = np.random.default_rng([self.seed, step, micro_step, rank])
        n_rep = int(round(self.repeat_fraction * self.batch_size))
        rows, positions = [], []
        for i in range(self.batch_size):
            if i < n_rep:
                n = (self.seq_len + 1) // 2
                start = self._start(rng, n)
                half = self.joined(start, start + n)
                rows.append(np.concatenate([half, half])[: self.seq_len])
                positions.append(np.arange(self.seq_len))  # one synthetic document
            else:
                start = self._start(rng, self.seq_len)
                rows.append(self.joined(start, start + self.seq_len))
                if self.packing == "documents":  # stream batches carry no positions
                    positions.append(self.positions(start, start + self.seq_len))
        ids = torch.from_numpy(np.stack(rows))  # [B, T]
        if self.packing == "stream":
            return {"input_ids": ids, "labels": ids.clone()}
        position_ids = torch.from_numpy(np.stack(positions))  # [B, T]
        labels = ids.clone()
        labels[:, 1:][position_ids[:, 1:] == 0] = IGNORE  # a document's first token: not predictable from another
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def document_rows(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """A ``documents`` batch with each document of each window on a row of its own, from position 0, padded at the
    end with ``pad_id`` (no target). For models that do not take restarting ``position_ids``: every row is then one
    document, so no state or attention crosses documents. The targets are the same tokens as in the packed batch,
    so the mean loss is the same number; the price is the padding."""
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    for b in range(ids.shape[0]):
        starts = [0, *(torch.nonzero(pos[b, 1:] == 0).flatten() + 1).tolist(), ids.shape[1]]
        pieces += [(ids[b, s:e], labels[b, s:e]) for s, e in zip(starts[:-1], starts[1:], strict=True) if e > s]
    width = max(len(p[0]) for p in pieces)
    out_ids = ids.new_full((len(pieces), width), pad_id)  # [pieces, width]
    out_labels = labels.new_full((len(pieces), width), IGNORE)
    for r, (x, y) in enumerate(pieces):
        out_ids[r, : len(x)], out_labels[r, : len(y)] = x, y
    return {"input_ids": out_ids, "labels": out_labels}
