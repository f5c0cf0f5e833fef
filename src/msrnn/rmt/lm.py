"""An RMT as a StatefulLM: the state is the memory plus the current segment's KV cache (bounded by S + 2m)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

import msrnn.rmt.encoder  # noqa: F401  (registers the encoder config with AutoConfig)
from msrnn.compat import cache_kwargs, check_advanced
from msrnn.models.hf import cache_kv_nbytes
from msrnn.protocol import check_batch_size, check_chunk, check_state, owner, tensor_nbytes
from msrnn.rmt.wrapper import MemoryWrapper


@dataclass
class RMTState:
    """The memory, the current segment's cache (None between segments) and how far into the segment it is."""
    memory: torch.Tensor  # [B, m, d]
    cache: DynamicCache | None  # keys/values of [read memory + the current segment's tokens so far]
    in_segment: int  # tokens of the current segment already consumed
    batch_size: int
    seen: int = 0
    owner: str = ""  # the adapter that made it (msrnn.protocol.owner)


class RMTLM:
    """Streams any length through a MemoryWrapper: tokens go into the current segment through a KV cache; when
    a segment is full its write-memory slots are fed to get the next memory, and the cache is dropped.
    Logits equal the wrapper's segment-by-segment forward."""

    def __init__(self, wrapper: MemoryWrapper, tokenizer=None) -> None:
        self.wrapper, self.tokenizer = wrapper, tokenizer
        self.vocab_size = int(wrapper.model.config.vocab_size)

    def init_state(self, batch_size: int) -> RMTState:
        """The learned initial memory for ``batch_size`` sequences, before any segment."""
        check_batch_size(batch_size)
        return RMTState(self.wrapper.initial_memory(batch_size).detach().clone(), None, 0, batch_size,
                        owner=owner(self, self.wrapper))

    def _start_segment(self, state: RMTState) -> None:
        model, m = self.wrapper.model, self.wrapper.m
        cache = DynamicCache(config=model.config)
        pos = torch.arange(m)[None].expand(state.batch_size, -1)
        model(inputs_embeds=state.memory, position_ids=pos, use_cache=True, **cache_kwargs(cache, model))
        check_advanced(cache, 0, m, type(model).__name__)
        state.cache = cache

    def _finish_segment(self, state: RMTState) -> None:
        model, m = self.wrapper.model, self.wrapper.m
        start = m + state.in_segment
        pos = torch.arange(start, start + m)[None].expand(state.batch_size, -1)
        out = model(inputs_embeds=state.memory, position_ids=pos, use_cache=True, output_hidden_states=True,
                    **cache_kwargs(state.cache, model))
        state.memory, state.cache, state.in_segment = out.hidden_states[-1], None, 0

    def forward_chunk(self, input_ids: torch.Tensor, state: RMTState) -> tuple[torch.Tensor, RMTState]:
        """Feed tokens across segment boundaries (memory updated at each); logits [B, T, V] fp32."""
        check_state(state, RMTState, owner(self, self.wrapper))
        input_ids = check_chunk(input_ids, state.batch_size, self.vocab_size)
        model, m, S = self.wrapper.model, self.wrapper.m, self.wrapper.config.segment_length
        outs, pos = [], 0
        while pos < input_ids.shape[1]:
            if state.cache is None:
                self._start_segment(state)
            take = min(S - state.in_segment, input_ids.shape[1] - pos)
            ids = input_ids[:, pos : pos + take]
            p = torch.arange(m + state.in_segment, m + state.in_segment + take)[None].expand(state.batch_size, -1)
            before = state.cache.get_seq_length()
            out = model(input_ids=ids, position_ids=p, use_cache=True, **cache_kwargs(state.cache, model))
            check_advanced(state.cache, before, take, type(model).__name__)
            outs.append(out.logits.float())
            state.in_segment += take
            pos += take
            if state.in_segment == S:
                self._finish_segment(state)
        state.seen += input_ids.shape[1]
        return torch.cat(outs, dim=1), state

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
