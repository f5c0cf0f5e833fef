"""Recurrent Memory Transformer around any HF decoder-only causal LM (Bulatov et al., 2022; 2023).

Each segment is processed as ``[read memory] segment [write memory]``; the new memory is the final hidden states
(after the model's final norm) at the write slots; the initial memory is a learned parameter. Positions restart at
0 in every segment, so any stream length stays inside the model's trained positions.

Truncated BPTT (``bptt_depth = k``): only the last k segments are connected through the memory, so the loss of the
last segment reaches back k segments; ``-1`` keeps the whole chain. Unlike the upstream ``framework_accel`` branch
(which detached a local variable and so never truncated), the detached tensor is the one carried forward; a test
checks that the first segment's gradient is exactly zero.

Batches may mix lengths: sequences are right-aligned (left-padded, ``attention_mask`` 0 on padding) so every
question ends the last segment, as in the report's encoder code. A segment that is all padding for a sample
passes that sample's memory through unchanged.

The wrapper is a ``PreTrainedModel`` whose ``config.json`` holds the backbone's config, so ``save_pretrained``
stores backbone and memory together and ``from_pretrained`` rebuilds both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from msrnn.compat import cache_kwargs, check_advanced, model_output
from msrnn.errors import ConfigError
from msrnn.models.auto import register_auto
from msrnn.models.state_cache import StateCache, refuse_padding, stateful_forward_cache
from msrnn.rmt.config import RMTConfig, max_positions


@dataclass
class RMTState:
    """The memory, the current segment's cache (None between segments) and how far into the segment it is."""
    memory: torch.Tensor  # [B, m, d]
    cache: DynamicCache | None  # keys/values of [read memory + the current segment's tokens so far]
    in_segment: int  # tokens of the current segment already consumed
    batch_size: int
    seen: int = 0
    owner: str = ""  # the adapter that made it (msrnn.protocol.owner)


class MemoryWrapper(PreTrainedModel, GenerationMixin):
    """A decoder with memory tokens read at each segment's start and written at its end (RMT)."""
    config_class = RMTConfig
    # gradient_checkpointing_enable() reaches the backbone's decoder layers, which checkpoint themselves.
    supports_gradient_checkpointing = True
    base_model_prefix = "rmt"
    _supports_sdpa = True

    def __init__(self, config: RMTConfig, backbone: Any = None) -> None:
        super().__init__(config)
        if backbone is None:
            from transformers import AutoModelForCausalLM

            backbone = AutoModelForCausalLM.from_config(config.backbone_config())
        m, d = config.num_memory_tokens, backbone.config.hidden_size
        span = config.segment_length + 2 * m
        limit = max_positions(backbone.config)
        if limit is not None and span > limit:
            raise ConfigError(f"segment_length + 2 * num_memory_tokens = {span} exceeds the model's {limit} "
                              "positions; shorten the segment or use fewer memory tokens")
        config.backbone = backbone.config.to_dict()
        self.model = backbone
        emb = backbone.get_input_embeddings().weight
        # The upstream init: memory rows on the scale of the token embeddings.
        self.memory = nn.Parameter(torch.randn(m, d) * emb.detach().float().std())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Leave everything as built: the backbone is pretrained (or loaded), the memory set in ``__init__``."""

    @classmethod
    def wrap(cls, model: Any, num_memory_tokens: int = 16, segment_length: int = 512, bptt_depth: int = -1,
             **config: Any) -> MemoryWrapper:
        """Wrap a live HF causal LM (its weights are kept as they are)."""
        from msrnn.models.loading import is_encoder_only

        if is_encoder_only(model.config) or not hasattr(model, "get_output_embeddings") \
                or model.get_output_embeddings() is None:
            raise ConfigError(f"{type(model).__name__} is not a causal LM; the decoder RMT needs a next-token head "
                              "(use MemoryEncoderClassifier for encoders such as BERT)")
        rmt = RMTConfig(num_memory_tokens=num_memory_tokens, segment_length=segment_length, bptt_depth=bptt_depth,
                        **config)
        return cls(rmt, backbone=model)

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's token embeddings (what a caller asks to size inputs; transformers cannot find them)."""
        return self.model.get_input_embeddings()

    @property
    def m(self) -> int:
        """Memory tokens."""
        return self.config.num_memory_tokens

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """The learned initial memory, expanded to [B, m, d]."""
        return self.memory[None].expand(batch_size, -1, -1)  # [B, m, d]

    def cell(self, segment: torch.Tensor, memory: torch.Tensor, write: bool = True,
             attention_mask: torch.Tensor | None = None, logits: bool = True
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """One segment [B, s] with memory [B, m, d] -> (logits [B, s, V] or None, new memory [B, m, d] or None,
        final hidden states of the segment's tokens [B, s, d])."""
        emb = self.model.get_input_embeddings()(segment)  # [B, s, d]
        parts = [memory.to(emb.dtype), emb] + ([memory.to(emb.dtype)] if write else [])
        x = torch.cat(parts, dim=1)  # [B, m + s (+ m), d]
        B, m, s = x.shape[0], self.m, segment.shape[1]
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(B, -1)
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            ones = attention_mask.new_ones(B, m)
            kwargs["attention_mask"] = torch.cat([ones, attention_mask] + ([ones] if write else []), dim=1)
        if not logits:
            kwargs["logits_to_keep"] = 1  # the head is applied by the caller where it needs it
        out = self.model(inputs_embeds=x, position_ids=pos, output_hidden_states=True, use_cache=False, **kwargs)
        hidden = out.hidden_states[-1]  # [B, m + s (+ m), d], after the final norm
        seg_logits = out.logits[:, m : m + s] if logits else None
        return seg_logits, (hidden[:, -m:] if write else None), hidden[:, m : m + s]

    def _segments(self, T: int) -> tuple[int, int]:
        """(number of segments, left padding) of a right-aligned sequence of T tokens."""
        S = self.config.segment_length
        n = max(1, (T + S - 1) // S)
        return n, n * S - T

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, keep_logits: bool = True,
            align: str = "left") -> dict[str, Any]:
        """All segments of ``input_ids`` [B, T]. ``align='left'`` cuts from the start (the last segment may be
        short: language modelling); ``'right'`` pads the front so the last segment ends the sequence (tasks).
        Returns ``logits`` [B, T, V] (if kept), ``last_hidden`` [B, d] (the final token's) and ``memory``."""
        B, T = input_ids.shape
        S = self.config.segment_length
        if align == "right":
            n, pad = self._segments(T)
            if pad:
                input_ids = F.pad(input_ids, (pad, 0))
                mask = attention_mask if attention_mask is not None else input_ids.new_ones(B, T)
                attention_mask = F.pad(mask, (pad, 0))
        elif align == "left":
            n, pad = self._segments(T)[0], 0
        else:
            raise ConfigError(f"align must be 'left' or 'right', got {align!r}")
        memory = self.initial_memory(B)
        logits, last_hidden = [], None
        for i in range(n):
            if self.config.bptt_depth != -1 and 0 < i < n - self.config.bptt_depth + 1:
                memory = memory.detach()  # truncate: this segment's input memory carries no gradient back
            seg = input_ids[:, i * S : (i + 1) * S]
            seg_mask = None if attention_mask is None else attention_mask[:, i * S : (i + 1) * S]
            if seg_mask is not None and bool(seg_mask.all()):
                seg_mask = None
            seg_logits, new_memory, hidden = self.cell(seg, memory, write=True, attention_mask=seg_mask,
                                                       logits=keep_logits)
            if seg_mask is not None:
                # Samples with no tokens in this segment keep their memory: they have not started yet.
                live = seg_mask.any(dim=1)[:, None, None]
                new_memory = torch.where(live, new_memory, memory.to(new_memory.dtype))
            memory = new_memory
            last_hidden = hidden[:, -1]
            if keep_logits:
                logits.append(seg_logits)
        out: dict[str, Any] = {"memory": memory, "last_hidden": last_hidden}
        if keep_logits:
            out["logits"] = torch.cat(logits, dim=1)[:, pad:]
        return out

    def final_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, V] after the last token of right-aligned sequences (task answers)."""
        h = self.run(input_ids, attention_mask, keep_logits=False, align="right")["last_hidden"]
        return self.model.get_output_embeddings()(h).float()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                labels_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                use_cache: bool | None = None, final: bool = False, **kwargs: Any) -> Any:
        """Language modelling over all segments (or, with ``labels_mask``, only where it is true: answer-only).

        ``final=True`` returns only ``logits`` [B, V] after the last token, segments aligned to the end
        (:meth:`final_logits`, what task training scores): through ``forward``, so a DistributedDataParallel wrapper
        sees the call and synchronises gradients.

        With a cache (``generate`` passes ``use_cache=True``) the tokens stream through the memory instead,
        continuing the cache's state (``RMTLM.forward_chunk``: segments cut from the start, the memory updated
        at each segment's end), so ``generate()`` and ``pipeline("text-generation")`` work with a constant state."""
        if final:
            if labels is not None or use_cache or kwargs:
                raise TypeError("MemoryWrapper.forward(final=True) takes input_ids and attention_mask only")
            return {"logits": self.final_logits(input_ids, attention_mask)}
        cache = stateful_forward_cache(kwargs, use_cache, labels, 1, "a memory")
        if cache is not None:
            return self._forward_stateful(input_ids, attention_mask, cache)
        if kwargs:
            raise TypeError(f"MemoryWrapper.forward() got unexpected arguments {sorted(kwargs)}")
        out = self.run(input_ids, attention_mask, keep_logits=True, align="left")
        if labels is not None:
            shift_logits = out["logits"][:, :-1].float()
            shift_labels = labels[:, 1:]
            mask = torch.ones_like(shift_labels, dtype=torch.bool) if labels_mask is None else labels_mask[:, 1:]
            if attention_mask is not None:
                mask = mask & attention_mask[:, 1:].bool()
            nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none")  # [B, T-1]
            out["loss"] = (nll * mask).sum() / mask.sum().clamp(min=1)
        return out

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not build a DynamicCache from this config (it has no layer count of its own): the
        first stateful forward makes the StateCache and returns it (transformers' hook for custom caches)."""
        return False

    def init_state(self, batch_size: int) -> RMTState:
        """The learned initial memory for ``batch_size`` sequences, before any segment (the streaming state)."""
        return RMTState(self.initial_memory(batch_size).detach().clone(), None, 0, batch_size)

    def _start_segment(self, state: RMTState) -> None:
        m = self.m
        cache = DynamicCache(config=self.model.config)
        pos = torch.arange(m)[None].expand(state.batch_size, -1)
        self.model(inputs_embeds=state.memory, position_ids=pos, use_cache=True, **cache_kwargs(cache, self.model))
        check_advanced(cache, 0, m, type(self.model).__name__)
        state.cache = cache

    def _finish_segment(self, state: RMTState) -> None:
        m = self.m
        start = m + state.in_segment
        pos = torch.arange(start, start + m)[None].expand(state.batch_size, -1)
        out = self.model(inputs_embeds=state.memory, position_ids=pos, use_cache=True, output_hidden_states=True,
                         **cache_kwargs(state.cache, self.model))
        state.memory, state.cache, state.in_segment = out.hidden_states[-1], None, 0

    def step(self, input_ids: torch.Tensor, state: RMTState, last_only: bool = False) -> torch.Tensor:
        """Stream tokens [B, T] (validated by the caller) across segment boundaries: they go into the current
        segment through a KV cache; when a segment is full its write-memory slots are fed to get the next memory,
        and the cache is dropped. Updates ``state`` in place; logits [B, T, V] fp32 equal :meth:`run`'s segment by
        segment forward (``last_only``: [B, 1, V] after the last token, the head run on that position alone)."""
        model, m, S = self.model, self.m, self.config.segment_length
        outs, pos = [], 0
        while pos < input_ids.shape[1]:
            if state.cache is None:
                self._start_segment(state)
            take = min(S - state.in_segment, input_ids.shape[1] - pos)
            ids = input_ids[:, pos : pos + take]
            p = torch.arange(m + state.in_segment, m + state.in_segment + take)[None].expand(state.batch_size, -1)
            before = state.cache.get_seq_length()
            keep = {"logits_to_keep": 1} if last_only else {}
            out = model(input_ids=ids, position_ids=p, use_cache=True, **keep, **cache_kwargs(state.cache, model))
            check_advanced(state.cache, before, take, type(model).__name__)
            state.in_segment += take
            pos += take
            if not last_only or pos == input_ids.shape[1]:
                outs.append(out.logits.float())
            if state.in_segment == S:
                self._finish_segment(state)
        state.seen += input_ids.shape[1]
        return torch.cat(outs, dim=1)

    def _forward_stateful(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          cache: StateCache) -> CausalLMOutputWithPast:
        refuse_padding(attention_mask, "the memory")
        if cache.state is None:
            cache.state = self.init_state(input_ids.shape[0])
        logits = self.step(input_ids, cache.state)
        cache.seen = cache.state.seen
        return model_output(CausalLMOutputWithPast, logits=logits, cache=cache)

register_auto("msrnn_rmt", RMTConfig, MemoryWrapper, ("AutoModel", "AutoModelForCausalLM"))
