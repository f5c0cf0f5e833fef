"""SupraForCausalLM: a Llama-family model whose softmax attention is replaced by SUPRA's linear attention.

    o = W_O . GroupNorm_h( sum_{j<=i} gamma_h^(i-j) < RoPE(phi(q_i)), RoPE(phi(k_j)) / sqrt(d) > v_j )
    phi(x) = ReLU(W x + b)

Following the official code (TRI-ML/linear_open_lm), not the paper's prose, where they differ:
phi is one dense Linear across all heads (``feature_map="dense"``; ``"per_head"`` is offered), keys get their own
phi under GQA (MHA shares it), RoPE comes after phi, there is no denominator (a per-head GroupNorm without affine
replaces it), and the default decay is Lightning's exp(-2^(-8(h+1)/H)), not RetNet's.

The recurrent state [B, H, Dk, Dv] lives in :class:`SupraCache` (a ``transformers.Cache``), always fp32.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from msrnn.compat import model_output, output_cache, take_cache
from msrnn.errors import ConfigError
from msrnn.models.auto import register_auto
from msrnn.models.hf import rope_theta, rope_type
from msrnn.rope import apply_rope
from msrnn.supra.ops import (
    BACKENDS,
    DECAYS,
    chunked,
    document_starts,
    fla_chunked,
    log_decay,
    recurrent_step,
    resolve_backend,
)

log = logging.getLogger(__name__)

FEATURE_MAPS = ("dense", "per_head")


class SupraConfig(LlamaConfig):
    """A Llama config plus SUPRA's choices (see the module docstring)."""

    model_type = "msrnn_supra"

    def __init__(self, decay: str = "lightning", feature_map: str = "dense", linear_chunk_size: int = 64,
                 norm_eps: float = 1e-5, qkv_bias: bool | None = None, o_bias: bool | None = None,
                 state_dtype: str = "float32", linear_backend: str = "auto", feature_dim: int | None = None,
                 **kwargs: Any) -> None:
        # Checked before LlamaConfig's own validation so users get one clear msrnn error.
        hidden, heads = kwargs.get("hidden_size", 4096), kwargs.get("num_attention_heads", 32)
        if hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not divisible by {heads} heads; pick a divisor")
        if (kwargs.get("head_dim") or hidden // heads) % 2:
            raise ConfigError(f"head_dim {kwargs.get('head_dim') or hidden // heads} is odd; RoPE needs an even "
                              "head dimension")
        super().__init__(**kwargs)
        if decay not in DECAYS:
            raise ConfigError(f"unknown decay schedule {decay!r}; use one of {', '.join(DECAYS)}")
        if feature_map not in FEATURE_MAPS:
            raise ConfigError(f"unknown feature map {feature_map!r}; use dense or per_head")
        if linear_backend not in BACKENDS:
            raise ConfigError(f"unknown linear-attention backend {linear_backend!r}; use auto, torch or fla")
        if linear_chunk_size < 1:
            raise ConfigError("linear_chunk_size must be >= 1")
        if feature_dim is not None and (feature_dim < 2 or feature_dim % 2):
            raise ConfigError(f"feature_dim must be an even number >= 2 (RoPE rotates pairs), got {feature_dim}")
        if feature_dim is not None and feature_dim != self.head_dim_ and rope_type(self) != "default":
            raise ConfigError(f"feature_dim {feature_dim} differs from head_dim {self.head_dim_}, which needs the "
                              f"default RoPE; this model uses {rope_type(self)!r} (keep feature_dim = head_dim)")
        if state_dtype != "float32":
            warnings.warn(f"state_dtype={state_dtype!r} requested; SUPRA keeps its recurrent state in float32 "
                          "(lower precision drifts over long streams)", stacklevel=2)
            state_dtype = "float32"
        self.decay = decay
        self.feature_map = feature_map
        self.linear_chunk_size = linear_chunk_size
        self.norm_eps = norm_eps
        self.qkv_bias = self.attention_bias if qkv_bias is None else qkv_bias
        self.o_bias = self.attention_bias if o_bias is None else o_bias
        self.state_dtype = state_dtype
        self.feature_dim = feature_dim
        self.linear_backend = linear_backend

    @property
    def head_dim_(self) -> int:
        """Per-head width (``head_dim`` or hidden / heads)."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def phi_dim(self) -> int:
        """Width of phi(q), phi(k) per head: the state is [H, phi_dim, head_dim], so this sizes the state."""
        return self.feature_dim or self.head_dim_


class SupraStateLayer(CacheLayerMixin):
    """One layer's recurrent state; ``get_seq_length`` counts tokens seen (positions continue from there)."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.state: torch.Tensor | None = None
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate until the first chunk sets the state."""
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Refused: a SUPRA layer holds a recurrent state, not keys and values."""
        raise ConfigError("SupraCache holds recurrent states, not keys and values")

    def get_seq_length(self) -> int:
        """Tokens seen: positions continue from here."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Linear attention ignores the mask; report a q x q one so long streams never build a huge mask.
        """(columns, offset) for transformers' mask builders; linear attention needs no mask."""
        return query_length, self.seen

    def get_max_length(self) -> int:
        """-1: the state does not grow with length."""
        return -1

    def get_max_cache_shape(self) -> int:  # the name transformers < 5.5 declares abstract (unbounded: -1)
        """-1: no maximum (transformers 5.4 asks for it)."""
        return -1

    def reset(self) -> None:
        """Forget the state (a fresh sequence)."""
        self.state, self.seen, self.is_initialized = None, 0, False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences at ``indices``."""
        if self.state is not None:
            self.state = self.state[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence's state ``repeats`` times."""
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the sequences for beam search."""
        self.batch_select_indices(beam_idx)


class SupraCache(Cache):
    """Constant-size state for a SupraForCausalLM: one fp32 [B, H, Dk, Dv] tensor per layer."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[SupraStateLayer() for _ in range(num_layers)])

    def state_nbytes(self) -> int:
        """Bytes of every layer's recurrent state."""
        return sum(layer.state.numel() * layer.state.element_size() for layer in self.layers
                   if layer.state is not None)


class FeatureMap(nn.Module):
    """phi(x) = ReLU(W x + b) over the concatenated heads (dense) or per head, head_dim -> out_dim per head."""

    def __init__(self, heads: int, head_dim: int, kind: str, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = out_dim or head_dim
        self.heads, self.head_dim, self.out_dim, self.kind = heads, head_dim, out_dim, kind
        if kind == "dense":
            self.proj = nn.Linear(heads * head_dim, heads * out_dim, bias=True)
        else:
            ref = nn.Linear(head_dim, out_dim)  # per-head weights with nn.Linear's default init, as the official code
            self.weight = nn.Parameter(torch.stack([ref.weight.detach().clone() for _ in range(heads)]))
            self.bias = nn.Parameter(torch.stack([ref.bias.detach().clone() for _ in range(heads)]))
            for h in range(heads):
                nn.init.kaiming_uniform_(self.weight.data[h], a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, heads * head_dim] -> [B, heads, T, out_dim]."""
        B, T, _ = x.shape
        if self.kind == "dense":
            y = self.proj(x).view(B, T, self.heads, self.out_dim)
        else:
            y = torch.einsum("bthd,hed->bthe", x.view(B, T, self.heads, self.head_dim), self.weight) + self.bias
        return F.relu(y).transpose(1, 2)  # [B, heads, T, out_dim]


class SupraAttention(nn.Module):
    """Decayed linear attention with a learned feature map phi, in place of a softmax attention layer."""

    def __init__(self, config: SupraConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, Hkv = config.num_attention_heads, config.num_key_value_heads
        d = config.head_dim_
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d
        self.q_proj = nn.Linear(config.hidden_size, H * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, Hkv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, Hkv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * d, config.hidden_size, bias=config.o_bias)
        self.phi_dim = config.phi_dim
        self.phi_q = FeatureMap(H, d, config.feature_map, self.phi_dim)
        # Under GQA keys have fewer heads and their own phi; with MHA the official code shares phi.
        self.phi_k = FeatureMap(Hkv, d, config.feature_map, self.phi_dim) if Hkv != H else None
        # Fixed by the config, so not a buffer: transformers 5 builds models on the meta device and would leave a
        # non-persistent buffer unmaterialised after from_pretrained.
        self._log_gamma: torch.Tensor | None = None

    def log_gamma(self, device: torch.device) -> torch.Tensor:
        """Per-head log decay rates (fp32)."""
        if self._log_gamma is None or self._log_gamma.device != device:
            self._log_gamma = log_decay(self.num_heads, self.config.decay).to(device)
        return self._log_gamma

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                position_ids: torch.Tensor, state: SupraStateLayer | None = None,
                resets: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, T, hidden] -> [B, T, hidden]; ``state`` (this layer's, or None for a stateless
        forward) is read and advanced in place; ``resets`` [B, T] marks where packed documents start (the state is
        emptied there). Called by :class:`SupraModel`'s own decoder loop, so the state never travels through a
        transformers keyword."""
        B, T, _ = hidden_states.shape
        q = self.phi_q(self.q_proj(hidden_states))  # [B, H, T, F]
        k = (self.phi_k or self.phi_q)(self.k_proj(hidden_states))  # [B, Hkv, T, F]
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        if self.phi_dim != self.head_dim:  # RoPE at the feature width (same theta, F/2 frequencies)
            cos, sin = self._rope(position_ids, B, T, hidden_states.device, hidden_states.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, T, d]
        prev = state.state if state is not None else None
        lg = self.log_gamma(q.device)
        with torch.autocast(device_type=q.device.type, enabled=False):  # the recurrence runs in fp32
            if T == 1 and prev is not None:
                o, new_state = recurrent_step(q, k, v, lg, state=prev)
            elif resolve_backend(self.config.linear_backend, q.device) == "fla":
                o, new_state = fla_chunked(q, k, v, lg, initial_state=prev, resets=resets)
            else:
                o, new_state = chunked(q, k, v, lg, initial_state=prev, chunk_size=self.config.linear_chunk_size,
                                       resets=resets)
        if state is not None:
            state.state, state.seen, state.is_initialized = new_state, state.seen + T, True
        o = o.transpose(1, 2)  # [B, T, H, d]
        o = F.layer_norm(o.float(), (self.head_dim,), eps=self.config.norm_eps).to(hidden_states.dtype)
        return self.o_proj(o.reshape(B, T, -1))

    def _rope(self, position_ids: torch.Tensor | None, B: int, T: int, device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, F] of the default RoPE at width F = phi_dim (the model's own tables have head_dim)."""
        if position_ids is None:
            raise ConfigError("SUPRA with feature_dim != head_dim needs position_ids from the model")
        F_ = self.phi_dim
        inv = 1.0 / rope_theta(self.config) ** (torch.arange(0, F_, 2, device=device, dtype=torch.float32) / F_)
        ang = position_ids.to(device).float()[..., None] * inv  # [B or 1, T, F/2]
        emb = torch.cat([ang, ang], dim=-1).expand(B, T, F_)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class SupraModel(LlamaModel):
    """Llama's modules (so checkpoints keep Llama's tensor names) driven by msrnn's own decoder loop.

    Owning the loop (embeddings, pre-norm layers, final norm) means the recurrent state reaches each
    :class:`SupraAttention` as an argument, not through a keyword of transformers' forward functions, which
    has been renamed between minor releases (``past_key_values`` -> ``cache`` in 5.24)."""

    config_class = SupraConfig

    def __init__(self, config: SupraConfig) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = SupraAttention(config, i)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        """Embed, run every layer with its recurrent state (from ``cache``), then the final norm."""
        cache = take_cache(kwargs)
        if attention_mask is not None and attention_mask.dim() == 2 and bool((attention_mask == 0).any()):
            raise ConfigError("SUPRA models do not support padding (pad tokens would enter the recurrent state); "
                              "run sequences of different lengths one at a time")
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("pass exactly one of input_ids and inputs_embeds")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if cache is None and self.training and any(getattr(layer, "gradient_checkpointing", False)
                                                   for layer in self.layers):
            use_cache = False  # as transformers' decoders do: a recomputed layer would update its state twice
        if isinstance(cache, DynamicCache) and cache.get_seq_length() == 0:
            cache = None  # generate() makes an empty DynamicCache; SUPRA needs its own state cache
        if use_cache and cache is None:
            cache = SupraCache(self.config.num_hidden_layers)
        if cache is not None and not isinstance(cache, SupraCache):
            raise ConfigError("SUPRA models need a SupraCache, not a key/value cache")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, hidden]
        B, T = h.shape[:2]
        before = cache.get_seq_length() if cache is not None else 0
        # Packed documents (position ids given that restart): each layer's state is emptied where one starts.
        resets = document_starts(position_ids, B)
        if position_ids is None:
            position_ids = torch.arange(before, before + T, device=h.device)[None].expand(B, -1)  # [B, T]
        rope = self.rotary_emb(h, position_ids)
        hidden = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if state is None and self.training and getattr(layer, "gradient_checkpointing", False):
                # gradient_checkpointing_enable() marks each decoder layer; this loop calls the layer's parts itself
                # (so transformers' own layer hook never runs) and checkpoints the layer here. Only without a state:
                # recomputing a layer that updated its state in place would update it twice.
                h = layer._gradient_checkpointing_func(_decoder_layer, layer, h, rope, position_ids, None, resets)
            else:
                h = _decoder_layer(layer, h, rope, position_ids, state, resets)
            if hidden is not None:
                hidden.append(h)
        h = self.norm(h)
        if hidden is not None:
            hidden[-1] = h
        return model_output(BaseModelOutputWithPast, last_hidden_state=h, cache=cache if use_cache else None,
                            hidden_states=tuple(hidden) if hidden is not None else None)


    def shard_units(self) -> list[nn.Module]:
        """What FSDP shards one by one (msrnn.train.sharding): each layer's attention and MLP, the modules this
        loop calls as a whole (it never calls the decoder layer itself, so a hook on the layer would never run)."""
        return [m for layer in self.layers for m in (layer.self_attn, layer.mlp)]


def _decoder_layer(layer: nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   position_ids: torch.Tensor, state: Any, resets: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm decoder layer of :class:`SupraModel`: linear attention with the layer's state, then the MLP."""
    h = h + layer.self_attn(layer.input_layernorm(h), rope, position_ids, state, resets)
    return h + layer.mlp(layer.post_attention_layernorm(h))


class SupraForCausalLM(LlamaForCausalLM):
    """A causal LM head over :class:`SupraModel`; ``generate()`` runs with the constant-size SupraCache."""

    config_class = SupraConfig

    def __init__(self, config: SupraConfig) -> None:
        # LlamaForCausalLM's own __init__ would build a softmax LlamaModel only to replace it: a second model in
        # memory while this one is built (the peak of `msrnn convert supra`). Its other two fields are set here.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = SupraModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits (and the shifted cross-entropy when ``labels`` are given), carrying the state."""
        cache = take_cache(kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         cache=cache)
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep])
        loss = None
        if labels is not None:  # next-token loss, labels shifted here (-100 ignored), as transformers' heads do
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return model_output(CausalLMOutputWithPast, loss=loss, logits=logits, cache=output_cache(out),
                            hidden_states=out.hidden_states)


register_auto("msrnn_supra", SupraConfig, SupraForCausalLM, "AutoModelForCausalLM")
