"""Streaming perplexity for any :class:`~msrnn.protocol.StatefulLM`.

Each document starts from a fresh state and is fed chunk by chunk (``chunk_size=1`` is the token-by-token
protocol of the TOVA and StreamingLLM papers). Token ``i`` is scored by the logits at ``i - 1``, across chunk
boundaries too, so every document of ``n`` tokens contributes ``n - 1`` NLLs whatever the chunk size.
The result holds the NLL of every position (summed over documents) for perplexity-versus-position curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from msrnn.errors import ConfigError, DataError, NumericsError
from msrnn.protocol import StatefulLM, chunk_held_nbytes, peak_state_bytes, split, stream_chunks
from msrnn.ui import err_console


@dataclass
class StreamEvalConfig:
    """Settings of a streaming perplexity evaluation, validated when built."""
    chunk_size: int = 128
    max_tokens: int | None = 4096  # per document; None = whole documents
    max_documents: int | None = None
    min_tokens: int = 2  # documents shorter than this (before truncation) are skipped
    bucket_edges: tuple[int, ...] | None = None  # None = 0, 16, 32, 64, ... up to the longest document

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"chunk size must be >= 1, got {self.chunk_size}; use e.g. --chunk-size 128")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"max_documents must be >= 1, got {self.max_documents}")
        if self.min_tokens < 2:
            raise ConfigError("min_tokens must be >= 2 (one token has nothing to predict)")


@dataclass
class StreamEvalResult:
    """Perplexity overall and by position, peak and chunk-end state bytes, and throughput."""
    ppl: float
    nll: float
    tokens: int  # scored tokens
    documents: int
    peak_state_bytes: int  # the most one sequence's state holds at any offset (token by token, see protocol)
    chunk_end_state_bytes: int  # the most it held between this evaluation's chunks (misses in-block peaks)
    tokens_per_s: float
    seconds: float
    chunk_size: int
    nonfinite: int
    buckets: list[dict[str, float]]
    nll_sum_by_pos: np.ndarray = field(repr=False)
    count_by_pos: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (what ``eval ppl --json`` prints)."""
        return {
            "ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "documents": self.documents,
            "peak_state_bytes": self.peak_state_bytes, "chunk_end_state_bytes": self.chunk_end_state_bytes,
            "tokens_per_s": self.tokens_per_s,
            "seconds": self.seconds, "chunk_size": self.chunk_size, "nonfinite": self.nonfinite,
            "buckets": self.buckets,
        }

    def ppl_first(self, n: int) -> float:
        """Perplexity over the first ``n`` positions of every document (one pass gives every length)."""
        if n > len(self.count_by_pos):
            raise DataError(f"no document reaches position {n} (the longest scored has {len(self.count_by_pos)} "
                            "positions); ask for a smaller --at or longer documents")
        c = self.count_by_pos[:n].sum()
        if not c:
            raise DataError(f"no scored tokens in the first {n} positions")
        return exp_nll(self.nll_sum_by_pos[:n].sum() / c)

    def ppl_by_position(self, window: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(positions, ppl) with NLL averaged over ``window`` consecutive positions."""
        n = len(self.count_by_pos) // window * window
        s = self.nll_sum_by_pos[:n].reshape(-1, window).sum(1)
        c = self.count_by_pos[:n].reshape(-1, window).sum(1)
        keep = c > 0
        pos = (np.arange(len(s)) * window + window / 2)[keep]
        return pos, np.exp(s[keep] / c[keep])



def exp_nll(nll: float) -> float:
    """Perplexity from a mean NLL: inf when it overflows a float (a model that large-finite logits make hopeless is
    reported as such, not as a traceback)."""
    try:
        return float(math.exp(nll))
    except OverflowError:
        return math.inf

def default_edges(max_len: int) -> list[int]:
    """Position buckets 0, 16, 32, 64, ... up to ``max_len``."""
    edges, e = [0], 16
    while e < max_len:
        edges.append(e)
        e *= 2
    edges.append(max_len)
    return edges


def _bucketize(nll_sum: np.ndarray, count: np.ndarray, edges: Sequence[int]) -> list[dict[str, float]]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=False):
        c = int(count[lo:hi].sum())
        if c:
            mean = float(nll_sum[lo:hi].sum() / c)
            out.append({"start": int(lo), "end": int(hi), "tokens": c, "nll": mean, "ppl": exp_nll(mean)})
    return out


def _token_ids(doc: Sequence[int] | np.ndarray) -> np.ndarray:
    """A document as int64 token ids; refuses fractional or non-numeric ids (a cast would silently truncate 2.7)."""
    arr = np.asarray(doc)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise DataError(f"a document must be a flat sequence of integer token ids, got {arr.dtype} with shape "
                        f"{arr.shape}; tokenize it first")
    return arr.astype(np.int64)


@torch.inference_mode()
def evaluate_stream(lm: StatefulLM, documents: Sequence[Sequence[int] | np.ndarray], cfg: StreamEvalConfig,
                    progress: bool = False) -> StreamEvalResult:
    """Stream every document through ``lm`` and collect per-position NLLs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # min_tokens selects documents by their full length; max_tokens then truncates the selected ones.
    docs = [_token_ids(d) for d in documents]
    docs = [d[: cfg.max_tokens] for d in docs if len(d) >= cfg.min_tokens][: cfg.max_documents]
    if not docs:
        raise DataError(f"no document has at least {cfg.min_tokens} tokens; use more or longer data")
    max_len = max(len(d) for d in docs)
    nll_sum = np.zeros(max_len, dtype=np.float64)
    count = np.zeros(max_len, dtype=np.int64)
    peak, held, nonfinite, fed, busy = 0, 0, 0, 0, 0.0
    total = sum(len(d) for d in docs)
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeElapsedColumn(), disable=not progress, console=err_console) as bar:
        task = bar.add_task("eval", total=total)
        for doc in docs:
            ids = torch.from_numpy(doc).unsqueeze(0)  # [1, n]
            prev_last: torch.Tensor | None = None  # logits [V] of the previous chunk's last token
            for step in stream_chunks(lm, split(ids, cfg.chunk_size)):
                pos, n = step.start, step.logits.shape[1]
                busy += step.seconds
                fed += n
                peak = max(peak, lm.state_nbytes(step.state))
                held = max(held, chunk_held_nbytes(lm, step.state))  # + a KV prefill's in-chunk slots
                logits = step.logits[0].float().cpu()  # [T, V]
                # Row t predicts token pos + t + 1; the previous chunk's last row predicts token pos.
                rows = logits if prev_last is None else torch.cat([prev_last[None], logits])
                first = pos + 1 if prev_last is None else pos
                targets = ids[0, first : pos + n]
                rows = rows[: len(targets)]
                if len(targets):
                    nll = -torch.log_softmax(rows, dim=-1).gather(1, targets[:, None])[:, 0].double().numpy()
                    bad = ~np.isfinite(nll)
                    nonfinite += int(bad.sum())
                    nll = np.where(bad, 0.0, nll)
                    nll_sum[first : first + len(nll)] += nll
                    count[first : first + len(nll)] += ~bad
                prev_last = logits[-1]
                bar.update(task, advance=n)
    if nonfinite:
        raise NumericsError(f"{nonfinite} of {nonfinite + int(count.sum())} scored tokens have a NaN or infinite "
                            "loss (the model's logits are not finite), so there is no honest perplexity; the weights "
                            "are broken, most often by a diverged training run")
    scored = int(count.sum())
    true_peak = peak_state_bytes(lm, max_len, held)
    mean = float(nll_sum.sum() / max(scored, 1))
    edges = list(cfg.bucket_edges) if cfg.bucket_edges else default_edges(max_len)
    return StreamEvalResult(
        ppl=exp_nll(mean), nll=mean, tokens=scored, documents=len(docs), peak_state_bytes=int(true_peak),
        chunk_end_state_bytes=int(peak),
        tokens_per_s=fed / max(busy, 1e-9), seconds=busy, chunk_size=cfg.chunk_size, nonfinite=nonfinite,
        buckets=_bucketize(nll_sum, count, edges), nll_sum_by_pos=nll_sum, count_by_pos=count,
    )
