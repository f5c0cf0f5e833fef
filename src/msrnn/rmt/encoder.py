"""The encoder variant of RMT (Bulatov et al., 2023, "Scaling Transformer to 1M tokens and beyond with RMT").

Each segment is ``[CLS] mem x m [SEP] segment [SEP]`` through a BERT-family encoder; the memory slots of the
input embeddings are overwritten with the current memory (the encoder still adds its position embeddings and
LayerNorm, as upstream), and the new memory is the last hidden states at the same slots. The class comes from a
linear head on the last segment's [CLS] state, as in the report (its loss is the last segment's only).

Deviation from the official code: upstream adds m new vocabulary ids whose embedding rows are the initial memory;
here the initial memory is a separate ``[m, d]`` parameter (the same function, without resizing the vocabulary).
Upstream right-aligns and prepends empty segments for short samples; so do we, with left padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from msrnn.errors import ConfigError
from msrnn.models.auto import register_auto
from msrnn.rmt.config import RMTConfig, max_positions

SPECIAL_PER_SEGMENT = 3  # [CLS], [SEP] after the memory, [SEP] at the end


class RMTEncoderConfig(RMTConfig):
    """The encoder RMT's config: the memory settings plus the [CLS]/[SEP] ids and label names."""
    model_type = "msrnn_rmt_encoder"

    def __init__(self, cls_token_id: int = 101, sep_token_id: int = 102, **kwargs: Any) -> None:
        kwargs.setdefault("backbone_kind", "encoder")
        self.cls_token_id, self.sep_token_id = cls_token_id, sep_token_id
        super().__init__(**kwargs)


class MemoryEncoderClassifier(PreTrainedModel):
    """RMT over a BERT-family encoder: memory carried across segments, a label from [CLS]."""

    family = "rmt"  # its spec in msrnn.families
    config_class = RMTEncoderConfig
    base_model_prefix = "rmt"
    _supports_sdpa = True

    def __init__(self, config: RMTEncoderConfig, backbone: Any = None) -> None:
        super().__init__(config)
        if not config.label_names:
            raise ConfigError("the encoder RMT classifies: give it label_names (the task's answers)")
        if backbone is None:
            from transformers import AutoModel

            backbone = AutoModel.from_config(config.backbone_config(), add_pooling_layer=False)
        m, d = config.num_memory_tokens, backbone.config.hidden_size
        span = config.segment_length + m + SPECIAL_PER_SEGMENT
        limit = max_positions(backbone.config)
        if limit is not None and span > limit:
            raise ConfigError(f"segment_length + num_memory_tokens + 3 special tokens = {span} exceeds the "
                              f"encoder's {limit} positions; shorten the segment")
        config.backbone = backbone.config.to_dict()
        self.encoder = backbone
        emb = backbone.get_input_embeddings().weight
        self.memory = nn.Parameter(torch.randn(m, d) * emb.detach().float().std())
        self.classifier = nn.Linear(d, len(config.label_names))
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Leave everything as built: the encoder is pretrained, memory and head set in ``__init__``."""

    @classmethod
    def wrap(cls, encoder: Any, tokenizer: Any, label_names: list[str], num_memory_tokens: int = 10,
             segment_length: int = 499, **config: Any) -> MemoryEncoderClassifier:
        """Wrap a pretrained encoder and its tokenizer as a memory classifier over ``label_names``."""
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ConfigError("the encoder RMT needs a tokenizer with [CLS] and [SEP] tokens (a BERT-family one)")
        rmt = RMTEncoderConfig(num_memory_tokens=num_memory_tokens, segment_length=segment_length,
                               label_names=label_names, cls_token_id=tokenizer.cls_token_id,
                               sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                               **config)
        return cls(rmt, backbone=encoder)

    @property
    def m(self) -> int:
        """Memory tokens."""
        return self.config.num_memory_tokens

    def cell(self, segment: torch.Tensor, seg_mask: torch.Tensor, memory: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment [B, s] (mask [B, s]) with memory [B, m, d] -> (new memory [B, m, d], [CLS] state [B, d])."""
        B, m = segment.shape[0], self.m
        cls_ = segment.new_full((B, 1), self.config.cls_token_id)
        sep = segment.new_full((B, 1), self.config.sep_token_id)
        slots = segment.new_full((B, m), self.config.pad_token_id or 0)
        ids = torch.cat([cls_, slots, sep, segment, sep], dim=1)  # [B, 1 + m + 1 + s + 1]
        ones = seg_mask.new_ones(B, 1)
        mask = torch.cat([ones, seg_mask.new_ones(B, m), ones, seg_mask, ones], dim=1)
        emb = self.encoder.get_input_embeddings()(ids)  # [B, L, d]
        emb = torch.cat([emb[:, :1], memory.to(emb.dtype), emb[:, 1 + m :]], dim=1)
        hidden = self.encoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state  # [B, L, d]
        return hidden[:, 1 : 1 + m], hidden[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, Any]:
        """Classify right-aligned sequences [B, T] (padding on the left); loss on the last segment's [CLS]."""
        B, T = input_ids.shape
        S = self.config.segment_length
        n = max(1, (T + S - 1) // S)
        pad = n * S - T
        mask = attention_mask if attention_mask is not None else input_ids.new_ones(B, T)
        input_ids, mask = F.pad(input_ids, (pad, 0)), F.pad(mask, (pad, 0))
        memory = self.memory[None].expand(B, -1, -1)
        depth = self.config.bptt_depth
        cls_state = None
        for i in range(n):
            if depth != -1 and 0 < i < n - depth + 1:
                memory = memory.detach()
            seg, seg_mask = input_ids[:, i * S : (i + 1) * S], mask[:, i * S : (i + 1) * S]
            new_memory, cls_state = self.cell(seg, seg_mask, memory)
            live = seg_mask.any(dim=1)[:, None, None]
            memory = torch.where(live, new_memory, memory.to(new_memory.dtype))
        logits = self.classifier(cls_state).float()  # [B, labels]
        out: dict[str, Any] = {"logits": logits, "memory": memory}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


register_auto("msrnn_rmt_encoder", RMTEncoderConfig, MemoryEncoderClassifier, "AutoModel")
