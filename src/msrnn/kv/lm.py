"""Any HF causal LM + a policy + a budget = a bounded stateful LM (the msrnn protocol), and generate() support.

Every model is verified (:mod:`msrnn.kv.verify`) before msrnn's attention is switched on; the engine itself is
:mod:`msrnn.kv.engine`."""

from __future__ import annotations

from typing import Any

from msrnn.kv.cache import KVEvictionCache
from msrnn.kv.engine import BoundedKVLM, _compiled_step, _prepare, bounded_cache
from msrnn.kv.policies import Policy
from msrnn.kv.verify import check_supported, require_verified, rolling_rotations

__all__ = ["KVEvictionLM", "_compiled_step", "check_supported", "make_cache", "prepare_model"]


def prepare_model(model: Any) -> Any:
    """Switch ``model`` to msrnn's attention functions (same math; they evict for msrnn caches only), after
    verifying on a tiny twin of its class and config that eviction is exact there (:func:`msrnn.kv.verify.
    verdict_for`; cached per config and versions). A model that fails a check is refused naming the check."""
    check_supported(model)
    require_verified(model)
    return _prepare(model, (model.config._attn_implementation or "sdpa").removeprefix("msrnn_"))


def make_cache(model: Any, policy: Policy, prefill: str = "exact", positions: str = "original",
               ref: bool = False, storage: str = "naive") -> KVEvictionCache:
    """A fresh bounded cache for ``model`` (call :func:`prepare_model` first); ``ref`` and ``storage`` as in
    :class:`~msrnn.kv.cache.KVEvictionCache`. ``positions='rolling'`` re-rotates each layer with the rotation
    verification found for it (refused, naming the check, where none fits)."""
    rotations = rolling_rotations(model) if positions == "rolling" else None
    return bounded_cache(model, policy, prefill, positions, ref, storage, rotations)


class KVEvictionLM(BoundedKVLM):
    """A HF causal LM whose KV cache is bounded by ``policy``: a bounded multi-state RNN.

    With ``prefill='exact'`` (default) any chunk size gives the token-by-token result of the TOVA/StreamingLLM
    evaluation protocol; ``'oneshot'`` evicts once per chunk, scoring with the chunk's last query.
    ``ref=True`` runs the exact prefill through its slow readable twin (tests check the two agree).
    ``storage='fixed'`` decodes in place in a ``budget + 1`` slot buffer (the same kept tokens; tests check it).
    ``compile=True`` (fixed storage only) runs those in-place decode steps through ``torch.compile(model.forward)``:
    once every layer decodes in place, a step's tensor shapes and Python branches no longer change, so one graph
    serves every later step (no recompiles; on a GPU, CUDA graphs can replay it). Prefill chunks, and the step
    that turns a full layer into a fixed buffer, run eagerly.
    """

    def __init__(self, model: Any, policy: Policy, prefill: str = "exact", positions: str = "original",
                 tokenizer: Any = None, ref: bool = False, storage: str = "naive",
                 compile: bool = False) -> None:
        prepare_model(model)
        rotations = rolling_rotations(model) if positions == "rolling" else None  # verified once, here
        super().__init__(model, policy, prefill, positions, tokenizer, ref, storage, compile, rotations)
