"""The KV-eviction engine: a HF causal LM switched to msrnn's attention functions plus a bounded cache, driven
through the msrnn protocol and ``generate()``. It verifies nothing itself: :mod:`msrnn.kv.lm` puts verification
(:mod:`msrnn.kv.verify`) in front of it, and verification drives its tiny twins through it, so the import arrows
run lm -> verify -> engine and never back."""

from __future__ import annotations

import logging
from typing import Any

import torch

from msrnn.errors import ModelLoadError
from msrnn.kv.attention import register
from msrnn.kv.cache import KVEvictionCache, check_options
from msrnn.kv.policies import Policy
from msrnn.kv.rope import Rotation
from msrnn.models.hf import HFCausalLM
from msrnn.protocol import owner, tensor_nbytes

log = logging.getLogger("msrnn.kv.lm")  # the name users configure (warnings about compile and attention)


def _prepare(model: Any, current: str) -> Any:
    """The switch itself, unverified (verification uses it on its twins)."""
    register()
    if (model.config._attn_implementation or "").startswith("msrnn_"):
        return model
    base = current if current in ("sdpa", "eager") else "sdpa"
    if base != current:
        log.warning("attention %r is not supported with KV eviction; using sdpa", current)
    try:
        model.set_attn_implementation(f"msrnn_{base}")
    except (ValueError, ImportError) as exc:
        raise ModelLoadError(f"{type(model).__name__} does not let its attention implementation be set through "
                             f"transformers' attention-function registry ({str(exc).splitlines()[0]})") from exc
    return model


def bounded_cache(model: Any, policy: Policy, prefill: str = "exact", positions: str = "original",
                  ref: bool = False, storage: str = "naive", rotations: list[Rotation] | None = None
                  ) -> KVEvictionCache:
    """A fresh bounded cache for a prepared ``model``, unverified (``rotations``: the per-layer re-rotation that
    ``positions='rolling'`` uses)."""
    return KVEvictionCache(model.config.num_hidden_layers, policy, prefill=prefill, positions=positions,
                           rotations=rotations, ref=ref, storage=storage)


class BoundedKVLM(HFCausalLM):
    """The engine of :class:`~msrnn.kv.KVEvictionLM`, without its verification: a model already switched to msrnn's
    attention (``_prepare``) and the rolling rotations already found. Verification (:mod:`msrnn.kv.verify`) drives
    its twins through this class; users get :class:`~msrnn.kv.KVEvictionLM`, which verifies first.

    """

    family = "kv"  # its spec in msrnn.families

    def __init__(self, model: Any, policy: Policy, prefill: str = "exact", positions: str = "original",
                 tokenizer: Any = None, ref: bool = False, storage: str = "naive",
                 compile: bool = False, rotations: list[Rotation] | None = None) -> None:
        check_options(policy, prefill, positions, storage, compile)  # now, not at the first chunk
        super().__init__(model, tokenizer, cache_factory=lambda: bounded_cache(model, policy, prefill, positions,
                                                                               ref, storage, rotations))
        self.positions = positions
        self.prefill = prefill
        self.policy = policy
        self.storage = storage
        # A fixed buffer holds budget + 1 slots while decoding and budget again after a multi-token chunk, so its
        # state is not monotone: peaks are profiled token by token (msrnn.protocol.peak_state_bytes).
        self.monotone_state = storage == "naive"
        self.compile = compile
        self._compiled: Any = None
        self.compile_fell_back = False  # torch.compile gave up (its recompile limit): the step runs eagerly

    def _forward_fn(self, state, tokens: int) -> Any:
        """The compiled forward for an in-place decode step when ``compile`` is on; the model otherwise."""
        if not (self.compile and tokens == 1 and all(layer.free is not None for layer in state.cache.layers)):
            return self.model
        if self.compile_fell_back:
            return self.model
        if self._compiled is None:
            self._compiled = _compiled_step(self.model.forward, self._on_fallback)
        return self._compiled

    def _on_fallback(self, reason: str) -> None:
        """torch.compile gave up on the step: say so once, and run the step eagerly from now on."""
        if not self.compile_fell_back:
            log.warning("torch.compile fell back to eager for this model's decode step (%s); steps now run eagerly, "
                        "and compiled figures are eager ones", reason)
        self.compile_fell_back = True

    def state_owner(self) -> str:
        """A bounded cache's stamp names its policy and modes: a plain or differently bounded cache is refused."""
        return owner(self, self.model, self.policy, self.prefill, self.positions, self.storage)

    def rotates_past_limit(self) -> bool:
        """Whether keys are rotated by their original positions (so past the RoPE limit)."""
        return self.positions == "original"  # "rolling" re-indexes positions within the kept slots

    def state_nbytes(self, state) -> int:
        """Bytes the bounded cache holds: keys, values and the policy's bookkeeping."""
        return sum(_slot_nbytes(layer) + _layer_nbytes(layer) for layer in state.cache.layers)

    def chunk_peak_nbytes(self, state) -> int:
        """The most bytes carried from one token to the next during the last chunk: with ``oneshot`` or
        ``chunked:C`` prefill a late query of the chunk attends up to budget + chunk - 1 slots (the chunk's
        earlier tokens before the eviction), which the state after the chunk no longer shows."""
        total = 0
        for layer in state.cache.layers:
            slots, slot_bytes = layer.num_slots(), _slot_nbytes(layer)
            if layer.free is None and slots and layer.chunk_peak_slots > slots:
                slot_bytes = slot_bytes // slots * layer.chunk_peak_slots
            total += slot_bytes + _layer_nbytes(layer)
        return total


def _compiled_step(fn: Any, on_fallback: Any) -> Any:
    """``torch.compile(fn, dynamic=True)`` that never falls back to eager silently.

    Dynamo keeps up to ``recompile_limit`` (8) graphs per code object, shared by every model of a class, and then
    runs eagerly without an error: after 8 compiled models in one process, "compiled" figures were eager ones. Where
    torch offers it, each step compiles in an isolated region (its graphs count against no other model's limit), and
    a limit that is hit raises inside Dynamo, which msrnn reports (``on_fallback``) before running the step eagerly.
    """
    import inspect

    kwargs: dict[str, Any] = {"dynamic": True}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        kwargs["isolate_recompiles"] = True
    compiled = torch.compile(fn, **kwargs)
    config = torch._dynamo.config
    failure = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None)
    loud = failure is not None and hasattr(config, "fail_on_recompile_limit_hit")

    def step(*args: Any, **kw: Any) -> Any:
        if not loud:
            return compiled(*args, **kw)
        try:
            with config.patch(fail_on_recompile_limit_hit=True):
                return compiled(*args, **kw)
        except failure as exc:  # raised before the frame runs: the state is untouched, run it eagerly
            on_fallback(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'recompile limit'}")
            return fn(*args, **kw)

    return step


def _slot_nbytes(layer) -> int:
    """Bytes that scale with the slots a layer holds: keys, values, positions, validity, H2O sums."""
    return tensor_nbytes([layer.keys, layer.values, layer.slots])


def _layer_nbytes(layer) -> int:
    """Bytes per layer that do not: the token counter and a fixed buffer's free-slot index."""
    return tensor_nbytes([layer.counter, layer.free])
