"""Block-State Transformer language model (Fathi et al., 2023), with the SLIDE and full-attention baselines.

There is no official code; this follows the paper's appendix pseudocode with its two bugs fixed (the FFT runs
over time, and torch's irfft normalises). Deviations from BRECT's vertical cell, which BST reuses: standard
scaled dot-product attention with rotary positions instead of L2-normalised keys with learned scales and T5
relative biases; SwiGLU FFN and RMSNorm (Llama style) instead of the meliad MLP and LayerNorm. The SSM parameters
train with the shared trainer's learning rate and weight-decay groups (the S4 recipe gives them lr <= 1e-3 and no
weight decay).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from msrnn.bst.config import BSTConfig
from msrnn.bst.layers import BSTLayer
from msrnn.compat import model_output
from msrnn.errors import ConfigError
from msrnn.models.auto import register_auto
from msrnn.models.state_cache import StateCache, refuse_padding, stateful_forward_cache


class BSTForCausalLM(PreTrainedModel, GenerationMixin):
    """A Block-State Transformer language model (a ``PreTrainedModel``): parallel forward and streaming step.

    ``generate()`` (and ``pipeline("text-generation")``) run the streaming step with its constant-size state
    carried in a :class:`~msrnn.models.state_cache.StateCache`; a forward without a cache is the parallel form."""
    config_class = BSTConfig
    base_model_prefix = "bst"
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}
    main_input_name = "input_ids"
    # The SSM kernels load in fp32 under from_pretrained(dtype=bf16/fp16) too (msrnn.ssm.fp32 explains why).
    _keep_in_fp32_modules_strict = ["kernel"]
    supports_gradient_checkpointing = True
    _no_split_modules = ["BSTLayer"]  # called whole by forward: FSDP's units (msrnn.train.sharding)

    def __init__(self, config: BSTConfig) -> None:
        super().__init__(config)
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable(): each layer is recomputed
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BSTLayer(config, i in config.ssm_layers) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and not getattr(module, "_keep_init", False):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding (transformers' hook)."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding (transformers' hook)."""
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        """The LM head (tied to the embedding)."""
        return self.lm_head

    @property
    def block(self) -> int | None:
        """Tokens per block; None for full attention (one block that never ends)."""
        return None if self.config.variant == "full" else self.config.block_size

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, output_hidden_states: bool | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Parallel form: the sequence is padded at the end to whole blocks (causal, so padding changes nothing
        before it), all blocks run at once and the SSM convolves the whole sequence by FFT. As in transformers,
        ``logits_to_keep=k`` runs the head on the last k positions only (0: all), and ``output_hidden_states`` returns
        the embeddings and every layer's output, the last one after the final norm (the head's input).

        With a cache (``generate`` passes ``use_cache=True``) the tokens go through the streaming step instead,
        continuing the cache's state: the same code as ``BSTLM.forward_chunk``."""
        cache = stateful_forward_cache(kwargs, use_cache, labels, self.config.num_hidden_layers, "SSM states")
        if cache is not None:
            return self._forward_stateful(input_ids, attention_mask, cache, logits_to_keep)
        B, L = input_ids.shape
        index = torch.arange(L, device=input_ids.device).expand(B, -1)  # [B, L]
        if position_ids is not None and not torch.equal(position_ids.to(input_ids.device).expand(B, -1), index):
            # Blocks and the SSM's time axis are positions in the sequence: they cannot restart inside it.
            raise ConfigError("BST places tokens in blocks by their index in the sequence, so it takes no position "
                              "ids other than 0..T-1; put each document on a row of its own")
        W = self.block or L
        pad = (-L) % W
        x = self.embed_tokens(F.pad(input_ids, (0, pad)))
        hidden = [x[:, :L]] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, W)
            else:
                x = layer(x, W)
            if hidden is not None:
                hidden.append(x[:, :L])
        h = self.norm(x[:, :L])  # [B, L, d]
        if hidden is not None:
            hidden[-1] = h
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ConfigError("labels need the logits of every position; pass logits_to_keep=0 with labels")
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return model_output(CausalLMOutputWithPast, loss=loss, logits=logits,
                            hidden_states=tuple(hidden) if hidden is not None else None)

    def _forward_stateful(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          cache: StateCache, logits_to_keep: int = 0) -> CausalLMOutputWithPast:
        refuse_padding(attention_mask, "the SSM state")
        if cache.state is None:
            cache.state = self.init_state(input_ids.shape[0])
        logits = self.step(input_ids, cache.state, last_only=logits_to_keep == 1)
        if logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        cache.seen = cache.state["pos"]
        return model_output(CausalLMOutputWithPast, logits=logits, cache=cache)

    # ------------------------------------------------------------------ streaming
    def init_state(self, batch_size: int) -> dict[str, Any]:
        """The streaming state for ``batch_size`` sequences: position and every layer's state."""
        device = self.embed_tokens.weight.device
        return {"pos": 0, "layers": [layer.init_state(batch_size, device) for layer in self.layers]}

    def step(self, input_ids: torch.Tensor, state: dict[str, Any], last_only: bool = False) -> torch.Tensor:
        """Any number of tokens -> logits [B, T, V] (or [B, 1, V] after the last token with ``last_only``, the
        head run on that position alone); the chunk is cut at block boundaries."""
        W = self.block
        outs, i = [], 0
        while i < input_ids.shape[1]:
            offset = state["pos"] % W if W else state["pos"]
            take = input_ids.shape[1] - i if W is None else min(W - offset, input_ids.shape[1] - i)
            x = self.embed_tokens(input_ids[:, i : i + take])
            for layer, ls in zip(self.layers, state["layers"], strict=True):
                x = layer.step(x, ls, state["pos"], offset, W)
            state["pos"] += take
            i += take
            if not last_only:
                outs.append(self.lm_head(self.norm(x)))
            elif i == input_ids.shape[1]:
                outs.append(self.lm_head(self.norm(x[:, -1:])))
        return torch.cat(outs, dim=1)


register_auto("msrnn_bst", BSTConfig, BSTForCausalLM, "AutoModelForCausalLM")
