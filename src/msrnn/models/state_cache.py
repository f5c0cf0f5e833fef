"""A ``transformers.Cache`` that carries a family's own recurrent state through ``generate()``.

BST and the decoder RMT keep a state that is not a per-layer key/value list (SSM states and a block's keys; a
memory and a segment's cache). To run them under :class:`transformers.GenerationMixin` their forward takes this
cache: it holds the family's streaming state unchanged (the same object ``forward_chunk`` uses, so ``generate``
and ``msrnn generate`` run the same code) and reports the tokens seen, which is all ``generate`` reads from a cache
to feed only the new tokens. Beam search would reorder sequences inside that state; it is refused, not faked.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from msrnn.compat import take_cache
from msrnn.errors import ConfigError

_NO_BEAMS = ("beam search reorders sequences inside the recurrent state, which this model's cache does not "
             "support; use greedy decoding or sampling (num_beams=1)")


class _SeenLayer(CacheLayerMixin):
    """A stand-in layer: transformers asks a cache's layers for the sequence length and mask sizes only."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: StateCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the state lives in the owner."""
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Refused: this cache carries a recurrent state, not keys and values."""
        raise ConfigError("this cache carries a recurrent state, not keys and values")

    def get_seq_length(self) -> int:
        """Tokens seen so far."""
        return self.owner.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(columns, offset) for transformers' mask builders: the model builds its own masks."""
        return query_length, self.owner.seen

    def get_max_length(self) -> int:
        """-1: no maximum length."""
        return -1

    def get_max_cache_shape(self) -> int:  # the name transformers < 5.5 declares abstract
        """-1: no maximum length (transformers 5.4 asks for it)."""
        return -1

    def reset(self) -> None:
        """Forget the state (a fresh sequence)."""
        self.owner.state, self.owner.seen = None, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Refused (beam search)."""
        raise ConfigError(_NO_BEAMS)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Refused (beam search)."""
        raise ConfigError(_NO_BEAMS)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Refused (beam search)."""
        raise ConfigError(_NO_BEAMS)


class StateCache(Cache):
    """A family's streaming ``state`` (None until the first forward makes it) and the number of tokens seen."""

    def __init__(self, num_layers: int) -> None:
        self.state: Any = None
        self.seen = 0
        super().__init__(layers=[_SeenLayer(self) for _ in range(max(1, num_layers))])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Refused (beam search)."""
        raise ConfigError(_NO_BEAMS)


def stateful_forward_cache(kwargs: dict[str, Any], use_cache: bool | None, labels: Any, num_layers: int,
                           carries: str) -> StateCache | None:
    """The StateCache a forward continues, or None for the parallel form (the shared rule of BST and the RMT).

    Pops the cache from ``kwargs`` under either name; ``generate``'s empty DynamicCache is replaced (these models
    carry their own state); a key/value cache is refused; ``use_cache=True`` without labels starts a new one."""
    from transformers import DynamicCache

    cache = take_cache(kwargs)
    if isinstance(cache, DynamicCache) and cache.get_seq_length() == 0:
        cache = None
    if cache is not None and not isinstance(cache, StateCache):
        raise ConfigError(f"this model carries {carries}, not keys and values: pass no cache, or the one a previous "
                          "call returned")
    if cache is None and use_cache and labels is None:
        cache = StateCache(num_layers)
    return cache


def refuse_padding(attention_mask: torch.Tensor | None, what: str) -> None:
    """Pad tokens would enter a recurrent state: refuse a mask with any padding, naming ``what`` it would enter."""
    if attention_mask is not None and bool((attention_mask == 0).any()):
        raise ConfigError(f"streaming does not support padding (pad tokens would enter {what}); generate for "
                          "sequences of different lengths one at a time")
