"""The causal LM training loss without the full [T, vocab] logits.

A plain ``model(input_ids, labels=...)`` computes the head on every position and an fp32 copy of the logits for the
loss: at Llama-3's 128k vocabulary that is 0.5 MiB per token in bf16 plus 1 MiB in fp32, more than the rest of a
1B model's activations. :class:`ChunkedLMLoss` runs the model with ``logits_to_keep=1`` and ``output_hidden_states``,
then computes the cross-entropy ``chunk_tokens`` positions at a time, each chunk under activation checkpointing, so
at most one chunk's logits exist at once, in the forward and in the backward.

It depends on one behaviour of the model, verified on every step rather than assumed: the head applied to the last
hidden state must give exactly the logits the model itself returned for the last position (a model that scales or
soft-caps its logits, or whose last hidden state is not the head's input, fails it). Where that check fails, or the
model's forward takes no ``logits_to_keep``, the loss is the model's own (full logits): a failed check is a warning,
a model without ``logits_to_keep`` a line in the log. The readable twin is :func:`full_cross_entropy` (tested
equal, gradients included).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from msrnn.data.batches import IGNORE
from msrnn.protocol import accepts_keyword

log = logging.getLogger(__name__)


def training_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], **extra: Any) -> Any:
    """``model(**batch, **extra)`` as training calls it: with ``use_cache=False`` where the forward takes it. A
    training forward never reuses a key/value cache, building one costs memory, and transformers finds packed
    documents in ``position_ids`` only when there is none (:mod:`msrnn.train.packing` checks that)."""
    inner = getattr(model, "module", model)  # DDP's wrapped model; FSDP2 shards in place
    if accepts_keyword(inner.forward, "use_cache"):
        extra["use_cache"] = False
    return model(**batch, **extra)


def full_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` [B, T, V] against ``labels`` [B, T] (already shifted:
    ``labels[:, t]`` is the target of position t), fp32 logits, ``IGNORE`` labels skipped. The readable twin."""
    logits = head(hidden).float()  # [B, T, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def _chunk_nll_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module,
                          chunk_tokens: int = 1024) -> torch.Tensor:
    """:func:`full_cross_entropy` computed ``chunk_tokens`` positions at a time; each chunk's logits are recomputed
    in the backward instead of kept, so the peak holds one chunk's [chunk, V] logits, not [B * T, V]."""
    h = hidden.reshape(-1, hidden.shape[-1])  # [B * T, d]
    y = labels.reshape(-1)  # [B * T]
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_nll_sum, h[i : i + chunk_tokens], y[i : i + chunk_tokens], head,
                                   use_reentrant=False)
    # F.cross_entropy's mean over the labels that count (NaN when none does, as it is).
    return total / (y != IGNORE).sum()


class ChunkedLMLoss:
    """A trainer loss function ``(model, batch) -> loss`` for causal LMs that never holds the full logits (see the
    module doc); ``batch`` holds ``input_ids`` and ``labels`` (unshifted, as transformers takes them)."""

    def __init__(self, chunk_tokens: int = 1024, verify: bool = True) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        # verify=False only where values do not exist (the memory benchmark counts bytes on fake tensors).
        self.verify = verify
        self.fallback: str | None = None  # why the model's own loss is used, once a check failed

    def _use_full(self, reason: str, failed_check: bool = False) -> None:
        """Use the model's own loss from now on. A failed check is a warning (the model does not behave as a
        causal LM head is expected to); a model that simply takes no ``logits_to_keep`` (RMT, whose logits are
        bounded by its segment anyway) is noted in the log."""
        if self.fallback is None:
            (log.warning if failed_check else log.info)(
                "training loss: %s, so the model computes its own loss on full logits (more memory per token, the "
                "same loss)", reason)
        self.fallback = reason

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = getattr(model, "module", model)  # DDP's wrapped model; FSDP2 shards in place
        if self.fallback is None and not accepts_keyword(inner.forward, "logits_to_keep"):
            self._use_full(f"{type(inner).__name__}.forward takes no logits_to_keep")
        if self.fallback is not None:
            return training_forward(model, batch)["loss"]
        labels = batch["labels"]
        rest = {k: v for k, v in batch.items() if k != "labels"}
        out = training_forward(model, rest, logits_to_keep=1, output_hidden_states=True)
        hidden = out.get("hidden_states") if isinstance(out, dict) else getattr(out, "hidden_states", None)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if not hidden or head is None:
            self._use_full("the model returns no hidden states or has no output embedding", failed_check=True)
            return training_forward(model, batch)["loss"]
        h = hidden[-1]  # [B, T, d]
        if not self.verify:
            return chunked_cross_entropy(h[:, :-1], labels[:, 1:], head, self.chunk_tokens)
        with torch.no_grad():
            own = out["logits"]
            same = torch.equal(head(h[:, -1:].detach()).to(own.dtype), own.detach())
        if not same:  # check: head(last hidden state) == the model's own last logits
            self._use_full("check head_of_last_hidden_state_equals_logits failed (the model scales, caps or "
                           "otherwise transforms its logits)", failed_check=True)
            return training_forward(model, batch)["loss"]
        return chunked_cross_entropy(h[:, :-1], labels[:, 1:], head, self.chunk_tokens)
