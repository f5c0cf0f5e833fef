"""Any Hugging Face causal LM with its full (unbounded) KV cache, as a :class:`~msrnn.protocol.StatefulLM`.

This is the reference every bounded family is compared against: its state grows by
``2 * layers * kv_heads * head_dim * bytes`` per token.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from msrnn.compat import cache_kwargs, check_advanced, check_transformers_version, output_cache
from msrnn.errors import ConfigError
from msrnn.protocol import accepts_keyword, check_batch_size, check_chunk, check_state, owner, tensor_nbytes

log = logging.getLogger(__name__)


@dataclass
class HFState:
    """The transformers cache plus the number of tokens consumed (absolute positions start there)."""

    cache: Cache
    batch_size: int
    seen: int = 0
    owner: str = ""  # the adapter that made it (msrnn.protocol.owner)


# Models already warned about running RoPE past max_position_embeddings: one warning per model, however many
# adapters (a benchmark's full cache, windows and bounded caches) wrap it.
_WARNED_EXTRAPOLATION: weakref.WeakSet[Any] = weakref.WeakSet()


class HFCausalLM:
    """Adapter: a ``PreTrainedModel`` causal LM driven through the msrnn protocol.

    Positions are absolute (``seen .. seen + T - 1``) so a chunked stream equals one full forward.
    ``cache_factory`` lets other code supply a different ``transformers.Cache`` (e.g. an eviction cache)
    without changing the driving logic.
    """

    family = "hf"  # its spec in msrnn.families

    # The state never shrinks from one token to the next (the full cache grows; eviction and SUPRA saturate), so
    # its peak is at the last offset: see msrnn.protocol.peak_state_bytes. Tested in tests/test_evaluate.py. A cache
    # supplied through ``cache_factory`` promises nothing, so a plain adapter with one is profiled instead.
    monotone_state = True

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, cache_factory: Any = None) -> None:
        check_transformers_version()
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = int(model.config.vocab_size)
        self._cache_factory = cache_factory or (lambda: DynamicCache(config=model.config))
        if cache_factory is not None and type(self) is HFCausalLM:
            self.monotone_state = False
        self.max_positions, self.learned_positions = position_limit(model)
        # Whether the model's forward takes ``logits_to_keep`` (transformers' heads do): read off the signature
        # rather than assumed, since a remote or older head may not; without it the head runs on every position.
        self._keeps_logits = accepts_keyword(model.forward, "logits_to_keep")

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (inputs are moved there)."""
        return next(self.model.parameters()).device

    def init_state(self, batch_size: int) -> HFState:
        """An empty cache for ``batch_size`` sequences (see :class:`~msrnn.protocol.StatefulLM`)."""
        return HFState(cache=self._cache_factory(), batch_size=check_batch_size(batch_size), owner=self.state_owner())

    def state_owner(self) -> str:
        """The stamp on this adapter's states: the class, the model and what bounds the cache."""
        return owner(self, self.model)

    def forward_chunk(self, input_ids: torch.Tensor, state: HFState, last_only: bool = False
                      ) -> tuple[torch.Tensor, HFState]:
        """Feed ``input_ids`` [B, T] at absolute positions after those already seen; logits [B, T, V] fp32, or
        [B, 1, V] after the last token with ``last_only`` (the head runs on that position only, through the
        model's ``logits_to_keep`` where its ``forward`` takes it)."""
        check_state(state, HFState, self.state_owner())
        input_ids = check_chunk(input_ids, state.batch_size, self.vocab_size)
        T = input_ids.shape[1]
        self._check_positions(state.seen + T)
        input_ids = input_ids.to(self.device)
        position_ids = torch.arange(state.seen, state.seen + T, device=self.device).unsqueeze(0)  # [1, T]
        before = state.cache.get_seq_length()
        keep = {"logits_to_keep": 1} if last_only and T > 1 and self._keeps_logits else {}
        out = self._forward_fn(state, T)(input_ids=input_ids,
                                         position_ids=position_ids.expand(input_ids.shape[0], -1),
                                         use_cache=True, **keep, **cache_kwargs(state.cache, self.model))
        state.cache = output_cache(out)
        check_advanced(state.cache, before, T, type(self.model).__name__)
        state.seen += T
        logits = out.logits[:, -1:] if last_only else out.logits
        return logits.float(), state


    def _forward_fn(self, state: HFState, tokens: int) -> Any:
        """What runs the model on a chunk of ``tokens``: the model itself (a bounded cache may pick a compiled
        decode step)."""
        return self.model

    def state_nbytes(self, state: HFState) -> int:
        """Bytes of the keys and values the cache holds for all B sequences."""
        return cache_kv_nbytes(state.cache)

    def rotates_past_limit(self) -> bool:
        """Whether queries and keys are rotated by absolute positions (overridden when positions are re-indexed)."""
        return True

    def _check_positions(self, end: int) -> None:
        if self.max_positions is None or end <= self.max_positions:
            return
        if self.learned_positions:  # a learned table has no row for the position: an IndexError deep inside
            raise ConfigError(f"this model has learned positions up to {self.max_positions}, and the stream reaches "
                              f"{end}; keep prompt plus new tokens (or --max-tokens) within {self.max_positions}")
        if self.rotates_past_limit() and self.model not in _WARNED_EXTRAPOLATION:
            _WARNED_EXTRAPOLATION.add(self.model)  # RoPE runs past its limit: extrapolation, worth one warning
            log.warning("position %d is past the model's max_position_embeddings=%d: RoPE extrapolates from here, "
                        "outside the positions the model was configured for", end, self.max_positions)


def position_limit(model: Any) -> tuple[int | None, bool]:
    """(max positions, learned?) of a transformers model: a learned position table is a hard limit; RoPE is not."""
    limit = getattr(model.config, "max_position_embeddings", None)
    learned = any(isinstance(m, torch.nn.Embedding) and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))
                  for name, m in model.named_modules())
    return (int(limit) if isinstance(limit, int) else None), learned


def rope_type(config: Any) -> str:
    """The RoPE variant a transformers config names ("default" when it names none)."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def rope_theta(config: Any) -> float:
    """RoPE's base frequency, from ``rope_parameters`` (transformers 5) or the older ``rope_theta`` field."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def cache_kv_nbytes(cache: Cache | None) -> int:
    """Bytes of the keys and values a transformers cache holds (0 for None)."""
    return sum(tensor_nbytes([getattr(layer, "keys", None), getattr(layer, "values", None)])
               for layer in getattr(cache, "layers", []))
