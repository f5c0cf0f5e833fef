"""A BST model as a StatefulLM: the state is the SSM states plus the current block's keys and values (and the
previous block's for SLIDE), constant however long the stream; only the ``full`` baseline grows."""

from __future__ import annotations

from typing import Any

import torch

from msrnn.bst.modeling import BSTForCausalLM
from msrnn.protocol import check_batch_size, check_chunk, check_state, owner, tensor_nbytes


class BSTLM:
    """A :class:`BSTForCausalLM` as a StatefulLM: constant state (SSM states + current block keys/values)."""

    family = "bst"  # its spec in msrnn.families

    def __init__(self, model: BSTForCausalLM, tokenizer: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.config.vocab_size

    def init_state(self, batch_size: int) -> dict[str, Any]:
        """SSM states and empty block caches for ``batch_size`` sequences."""
        return {**self.model.init_state(check_batch_size(batch_size)), "owner": owner(self, self.model)}

    def forward_chunk(self, input_ids: torch.Tensor, state: dict[str, Any], last_only: bool = False
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Feed any number of tokens (cut at block boundaries inside); logits [B, T, V] fp32 ([B, 1, V] after the
        last token with ``last_only``)."""
        check_state(state, dict, owner(self, self.model))
        input_ids = check_chunk(input_ids, len(state["layers"][0]["k"]), self.vocab_size)
        ids = input_ids.to(self.model.embed_tokens.weight.device)
        return self.model.step(ids, state, last_only=last_only).float(), state

    def state_nbytes(self, state: dict[str, Any]) -> int:
        """Bytes of every layer's SSM state and block keys/values."""
        return tensor_nbytes(state["layers"])


def load_bst(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **_: Any) -> BSTLM:
    """Load a BST model directory (weights and tokenizer) as a :class:`BSTLM`."""
    from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for

    return BSTLM(load_hf_causal_lm(spec, device=device, dtype=dtype), load_tokenizer_for(spec))
