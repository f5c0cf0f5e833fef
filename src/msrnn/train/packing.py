"""Training on packed documents: how each model is given a window that holds several documents.

A ``documents`` batch (:mod:`msrnn.data.batches`) carries ``position_ids`` that restart where a document starts.
Whether a model honours that is a behaviour of its code and of the installed transformers (a softmax decoder
masks across restarting positions since transformers found packed sequences in ``position_ids``; SUPRA empties
its state there; BST places tokens in blocks by index and refuses such positions). So it is checked, not
declared: :func:`position_reset_failure` runs the model on two documents packed in one row and on each alone, and
the documents must get the same logits both ways. A model that passes trains on the packed batch; any other model
trains on :func:`~msrnn.data.batches.document_rows` (each document on a row of its own, padded), which is the same
loss at the cost of the padding. Either way no state crosses a document boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from msrnn.data.batches import document_rows
from msrnn.train.loss import training_forward

log = logging.getLogger(__name__)

CHECK = "position_ids_restart_documents"  # the check's name, as logs and msrnn.json report it


def _vocab(model: torch.nn.Module) -> int:
    """The model's vocabulary: its input embedding's rows, else its config's (a wrapper may not expose the former)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError):
        return int(model.config.vocab_size)


def position_reset_failure(model: torch.nn.Module, length: int = 40) -> str | None:
    """None when ``model`` treats position ids that restart as a new document (the logits of two documents packed
    in one row equal their logits alone); otherwise why not. ``length`` tokens per document: 40 puts the boundary
    inside SUPRA's 64-token chunk and the pair across one. In eval mode and without gradients; fp32 weights must
    agree to 1e-4 of the largest logit, lower precisions to 5e-2 (the two forms add in another order)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(_vocab(model), (1, length), generator=g).to(device) for _ in range(2))
    pos = torch.arange(length, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # Called as training calls it (no key/value cache: transformers finds packed documents only then).
            packed = training_forward(model, {"input_ids": torch.cat([a, b], 1),
                                              "position_ids": torch.cat([pos, pos])[None]})["logits"]
            alone = torch.cat([training_forward(model, {"input_ids": x})["logits"] for x in (a, b)], 1)  # [1, 2L, V]
    except Exception as exc:  # the model refuses such positions: it does not honour them
        return f"it refuses position ids that restart ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    finally:
        model.train(was_training)
    err = float((packed.float() - alone.float()).abs().max())
    scale = float(alone.float().abs().max())
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not err <= tol * max(scale, 1e-6):
        return (f"a document's logits changed by {err:.3g} (largest logit {scale:.3g}) when another document "
                "was packed before it")
    return None


class DocumentBatches:
    """A trainer batch function over a ``documents`` batch function that gives each model the form it honours
    (see the module doc). :meth:`choose` decides, once, on the model as it will train (placed, sharded)."""

    def __init__(self, batch_fn: Callable[..., dict[str, torch.Tensor]], pad_id: int) -> None:
        self.batch_fn, self.pad_id = batch_fn, pad_id
        self.layout: str | None = None  # "packed" or "rows", once chosen
        self.reason: str | None = None  # why rows: the failed check

    def choose(self, model: torch.nn.Module) -> str:
        """Run the check on ``model`` and pick the layout; every process of a run gets the same answer (the same
        weights and inputs)."""
        self.reason = position_reset_failure(model)
        self.layout = "packed" if self.reason is None else "rows"
        if self.reason is not None:
            log.info("packing: check %s failed for %s (%s), so each document of a window trains on a row of its "
                     "own (the same loss, plus padding)", CHECK, type(model).__name__, self.reason)
        return self.layout

    def record(self) -> dict[str, Any]:
        """What msrnn.json says about how documents were trained."""
        return {"packing": "documents", "layout": self.layout, "check": CHECK, "failed": self.reason}

    def form(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` (a ``documents`` batch) in the chosen layout."""
        if self.layout is None:
            raise RuntimeError("DocumentBatches.choose(model) must run before the first batch")
        return batch if self.layout == "packed" else document_rows(batch, self.pad_id)

    def __call__(self, *args: Any) -> dict[str, torch.Tensor]:
        return self.form(self.batch_fn(*args))
