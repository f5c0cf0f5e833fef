"""An RMT as a StatefulLM: the state is the memory plus the current segment's KV cache (bounded by S + 2m)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from msrnn.models.hf import cache_kv_nbytes
from msrnn.protocol import check_batch_size, check_chunk, check_state, owner, tensor_nbytes
from msrnn.rmt.wrapper import MemoryWrapper, RMTState


class RMTLM:
    """A :class:`MemoryWrapper` as a StatefulLM: a thin adapter over the wrapper's own ``step`` (tokens go into the
    current segment through a KV cache; a full segment writes the next memory and drops the cache). Logits equal
    the wrapper's segment-by-segment forward."""

    family = "rmt"  # its spec in msrnn.families

    def __init__(self, wrapper: MemoryWrapper, tokenizer=None) -> None:
        self.wrapper, self.tokenizer = wrapper, tokenizer
        self.vocab_size = int(wrapper.model.config.vocab_size)

    def init_state(self, batch_size: int) -> RMTState:
        """The learned initial memory for ``batch_size`` sequences, before any segment."""
        check_batch_size(batch_size)
        state = self.wrapper.init_state(batch_size)
        state.owner = owner(self, self.wrapper)
        return state

    def forward_chunk(self, input_ids: torch.Tensor, state: RMTState, last_only: bool = False
                      ) -> tuple[torch.Tensor, RMTState]:
        """Feed tokens across segment boundaries (memory updated at each; the wrapper's ``step``); logits
        [B, T, V] fp32 ([B, 1, V] after the last token with ``last_only``)."""
        check_state(state, RMTState, owner(self, self.wrapper))
        input_ids = check_chunk(input_ids, state.batch_size, self.vocab_size)
        return self.wrapper.step(input_ids, state, last_only=last_only), state

    def state_nbytes(self, state: RMTState) -> int:
        """Bytes of the memory plus the current segment's keys and values."""
        return tensor_nbytes(state.memory) + cache_kv_nbytes(state.cache)

    @torch.no_grad()
    def final_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] after the last token, computed as task training computes them
        (``MemoryWrapper.final_logits``: segments aligned to the end, the first one front-padded). Streaming cuts
        segments from the start instead, so when T is not a multiple of S the two see different segment
        boundaries and give different answers; the task scorer uses this method for that reason."""
        input_ids = check_chunk(input_ids, vocab_size=self.vocab_size)
        return self.wrapper.final_logits(input_ids.to(self.wrapper.memory.device))


def load_rmt(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **_: Any) -> Any:
    """Load an RMT model directory: a decoder wrapper as a streaming :class:`RMTLM`, an encoder classifier as is
    (it has no next-token head to stream; task evaluation uses it directly)."""
    from transformers import AutoConfig, AutoModel

    from msrnn.errors import ModelLoadError, one_line
    from msrnn.models.loading import _check_dir, load_tokenizer_for

    path = Path(spec)
    _check_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        model = AutoModel.from_pretrained(str(path), trust_remote_code=False, **({"dtype": dtype} if dtype else {}))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the RMT model at {spec} ({type(exc).__name__}: {one_line(exc)}); the "
                             "checkpoint may be corrupt, re-save it") from None
    model = model.to(device).eval()
    tokenizer = load_tokenizer_for(path)
    if config.backbone_kind == "encoder":
        model.tokenizer = tokenizer
        return model
    return RMTLM(model, tokenizer)
