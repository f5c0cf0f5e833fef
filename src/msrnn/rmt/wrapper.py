"""Recurrent Memory Transformer around any HF decoder-only causal LM (Bulatov et al., 2022; 2023).

Each segment is processed as ``[read memory] segment [write memory]``; the new memory is the final hidden states
(after the model's final norm) at the write slots; the initial memory is a learned parameter. Positions restart at
0 in every segment, so any stream length stays inside the model's trained positions.

Truncated BPTT (``bptt_depth = k``): only the last k segments are connected through the memory, so the loss of the
last segment reaches back k segments; ``-1`` keeps the whole chain. Unlike the upstream ``framework_accel`` branch
(which detached a local variable and so never truncated), the detached tensor is the one carried forward; a test
checks that the first segment's gradient is exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msrnn.errors import ConfigError


@dataclass
class RMTConfig:
    num_memory_tokens: int = 16
    segment_length: int = 512
    bptt_depth: int = -1  # -1 = full BPTT; k >= 1 = only the last k segments are connected through memory

    def __post_init__(self) -> None:
        if self.num_memory_tokens < 1:
            raise ConfigError("num_memory_tokens must be >= 1 (zero memory tokens is a plain segmented model)")
        if self.segment_length < 1:
            raise ConfigError("segment_length must be >= 1")
        if self.bptt_depth == 0 or self.bptt_depth < -1:
            raise ConfigError(f"bptt_depth must be -1 (full) or >= 1, got {self.bptt_depth}")


class MemoryWrapper(nn.Module):
    def __init__(self, model: Any, config: RMTConfig) -> None:
        super().__init__()
        self.model, self.config = model, config
        m, d = config.num_memory_tokens, model.config.hidden_size
        span = config.segment_length + 2 * m
        max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if max_pos is not None and span > max_pos:
            raise ConfigError(f"segment_length + 2 * num_memory_tokens = {span} exceeds the model's {max_pos} "
                              "positions; shorten the segment or use fewer memory tokens")
        emb = model.get_input_embeddings().weight
        self.memory = nn.Parameter(torch.randn(m, d) * emb.detach().float().std())

    @property
    def m(self) -> int:
        return self.config.num_memory_tokens

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        return self.memory[None].expand(batch_size, -1, -1)  # [B, m, d]

    def cell(self, segment: torch.Tensor, memory: torch.Tensor, write: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One segment [B, s] with memory [B, m, d] -> (logits [B, s, V], new memory [B, m, d] or None)."""
        emb = self.model.get_input_embeddings()(segment)  # [B, s, d]
        parts = [memory.to(emb.dtype), emb] + ([memory.to(emb.dtype)] if write else [])
        x = torch.cat(parts, dim=1)  # [B, m + s (+ m), d]
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        out = self.model(inputs_embeds=x, position_ids=pos, output_hidden_states=write, use_cache=False)
        logits = out.logits[:, self.m : self.m + segment.shape[1]]
        return logits, (out.hidden_states[-1][:, -self.m :] if write else None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                labels_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """All segments of input_ids [B, T]; LM loss over every token (or where ``labels_mask`` is true)."""
        B, T = input_ids.shape
        S = self.config.segment_length
        n = (T + S - 1) // S
        memory = self.initial_memory(B)
        logits = []
        for i in range(n):
            if self.config.bptt_depth != -1 and i > 0 and i < n - self.config.bptt_depth + 1:
                memory = memory.detach()  # truncate: this segment's input memory carries no gradient back
            seg_logits, memory = self.cell(input_ids[:, i * S : (i + 1) * S], memory, write=True)
            logits.append(seg_logits)
        out: dict[str, Any] = {"logits": torch.cat(logits, dim=1), "memory": memory}
        if labels is not None:
            shift_logits = out["logits"][:, :-1].float()
            shift_labels = labels[:, 1:]
            mask = torch.ones_like(shift_labels, dtype=torch.bool) if labels_mask is None else labels_mask[:, 1:]
            nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none")  # [B, T-1]
            out["loss"] = (nll * mask).sum() / mask.sum().clamp(min=1)
        return out
