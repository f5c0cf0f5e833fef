"""Any HF causal LM + a policy + a budget = a bounded stateful LM (the msrnn protocol), and generate() support."""

from __future__ import annotations

import logging
from typing import Any

import torch

from msrnn.errors import ModelLoadError
from msrnn.kv.attention import register
from msrnn.kv.cache import KVEvictionCache, check_compile
from msrnn.kv.policies import Policy
from msrnn.kv.rope import Rotation
from msrnn.kv.verify import named_refusals, require_verified, rolling_rotations
from msrnn.models.hf import HFCausalLM
from msrnn.models.loading import is_encoder_only
from msrnn.protocol import owner, tensor_nbytes

log = logging.getLogger(__name__)



def check_supported(model: Any) -> None:
    """Raise a clear error for models that have no decoder KV cache to bound, or whose attention has a feature
    eviction cannot honour (named: a sliding window, a softcap, chunked attention, ALiBi). Cheap: reads the config;
    :func:`prepare_model` then verifies the rest on a tiny twin (:mod:`msrnn.kv.verify`)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ModelLoadError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ModelLoadError(f"{cfg.model_type} is an encoder-decoder model; KV eviction supports decoder-only LMs")
    if is_encoder_only(cfg):
        raise ModelLoadError(f"{cfg.model_type} is an encoder-only model with no KV cache; use a decoder LM "
                             "such as Llama, Mistral, Qwen2 or GPT-2")
    if not isinstance(getattr(cfg, "num_hidden_layers", None), int):
        raise ModelLoadError(f"{type(model).__name__}'s config has no num_hidden_layers, so msrnn cannot give each "
                             "layer a bounded cache")
    reasons = named_refusals(model)
    if reasons:
        raise ModelLoadError(f"{type(model).__name__}: KV eviction cannot honour {'; '.join(reasons)}")


def prepare_model(model: Any) -> Any:
    """Switch ``model`` to msrnn's attention functions (same math; they evict for msrnn caches only), after
    verifying on a tiny twin of its class and config that eviction is exact there (:func:`msrnn.kv.verify.
    verdict_for`; cached per config and versions). A model that fails a check is refused naming the check."""
    check_supported(model)
    require_verified(model)
    return _prepare(model, (model.config._attn_implementation or "sdpa").removeprefix("msrnn_"))


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


def make_cache(model: Any, policy: Policy, prefill: str = "exact", positions: str = "original",
               reference: bool = False, storage: str = "naive") -> KVEvictionCache:
    """A fresh bounded cache for ``model`` (call :func:`prepare_model` first); ``reference`` and ``storage`` as in
    :class:`~msrnn.kv.cache.KVEvictionCache`. ``positions='rolling'`` re-rotates each layer with the rotation
    verification found for it (refused, naming the check, where none fits)."""
    rotations = rolling_rotations(model) if positions == "rolling" else None
    return _cache(model, policy, prefill, positions, reference, storage, rotations)


def _cache(model: Any, policy: Policy, prefill: str, positions: str, reference: bool, storage: str,
           rotations: list[Rotation] | None) -> KVEvictionCache:
    return KVEvictionCache(model.config.num_hidden_layers, policy, prefill=prefill, positions=positions,
                           rotations=rotations, reference=reference, storage=storage)


class KVEvictionLM(HFCausalLM):
    """A HF causal LM whose KV cache is bounded by ``policy``: a bounded multi-state RNN.

    With ``prefill='exact'`` (default) any chunk size gives the token-by-token result of the TOVA/StreamingLLM
    evaluation protocol; ``'oneshot'`` evicts once per chunk, scoring with the chunk's last query.
    ``reference=True`` runs the exact prefill through its slow readable twin (tests check the two agree).
    ``storage='fixed'`` decodes in place in a ``budget + 1`` slot buffer (the same kept tokens; tests check it).
    ``compile=True`` (fixed storage only) runs those in-place decode steps through ``torch.compile(model.forward)``:
    once every layer decodes in place, a step's tensor shapes and Python branches no longer change, so one graph
    serves every later step (no recompiles; on a GPU, CUDA graphs can replay it). Prefill chunks, and the step
    that turns a full layer into a fixed buffer, run eagerly.
    """

    def __init__(self, model: Any, policy: Policy, prefill: str = "exact", positions: str = "original",
                 tokenizer: Any = None, reference: bool = False, storage: str = "naive",
                 compile: bool = False) -> None:
        prepare_model(model)
        rotations = rolling_rotations(model) if positions == "rolling" else None  # verified once, here
        _cache(model, policy, prefill, positions, reference, storage, rotations)  # validate the options now
        if compile:
            check_compile(policy, storage)
        super().__init__(model, tokenizer, cache_factory=lambda: _cache(model, policy, prefill, positions, reference,
                                                                        storage, rotations))
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
    return tensor_nbytes([layer.keys, layer.values, layer.positions, layer.valid, layer.acc])


def _layer_nbytes(layer) -> int:
    """Bytes per layer that do not: the token counter and a fixed buffer's free-slot index."""
    return tensor_nbytes([layer.counter, layer.free])
