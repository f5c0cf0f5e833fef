"""A SUPRA model as a StatefulLM: constant state bytes however long the stream."""

from __future__ import annotations

from typing import Any

import torch

from msrnn.models.hf import HFCausalLM, HFState
from msrnn.supra.modeling import SupraCache


class SupraLM(HFCausalLM):
    """A SUPRA model as a StatefulLM: its recurrent state is a constant [layers, heads, F, d] fp32 tensor."""

    family = "supra"  # its spec in msrnn.families

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        super().__init__(model, tokenizer, cache_factory=lambda: SupraCache(model.config.num_hidden_layers))

    def state_nbytes(self, state: HFState) -> int:
        """Bytes of every layer's recurrent state."""
        return state.cache.state_nbytes()


def load_supra(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **_: Any) -> SupraLM:
    """Load a SUPRA model directory (weights and tokenizer) as a :class:`SupraLM`."""
    from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for

    return SupraLM(load_hf_causal_lm(spec, device=device, dtype=dtype), load_tokenizer_for(spec))
