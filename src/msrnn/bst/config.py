"""The Block-State Transformer config (Fathi et al., 2023, "Block-State Transformers")."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from msrnn.errors import ConfigError

VARIANTS = ("sh", "mh", "mf", "slide", "full")
KERNELS = ("s4", "unstruct")


class BSTConfig(PretrainedConfig):
    """``variant``: sh / mh / mf (BST context states: single-head, multi-head, multi-filter), ``slide``
    (sliding-window block attention over the current and previous block, no SSM) or ``full`` (causal attention
    over everything: the unbounded baseline). ``kernel``: ``s4`` (S4D, regenerable at any length) or
    ``unstruct`` (explicit taps up to ``filter_length``). ``num_key_value_heads``: grouped-query self-attention
    (the block keys/values, the bulk of the state, shrink by heads / kv_heads). ``ssm_layers``: indices of the
    layers that carry the SSM and cross-attention (default: the middle layer); the others do causal attention
    within the block."""

    model_type = "msrnn_bst"

    def __init__(self, vocab_size: int = 4096, hidden_size: int = 256, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, intermediate_size: int = 688, block_size: int = 64,
                 variant: str = "sh", kernel: str = "s4", state_size: int = 16, mf_states: int = 8,
                 ssm_layers: list[int] | None = None, filter_length: int = 512, ssm_dtype: str = "float32",
                 rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5, initializer_range: float = 0.02,
                 tie_word_embeddings: bool = True, num_key_value_heads: int | None = None, **kwargs: Any) -> None:
        if variant not in VARIANTS:
            raise ConfigError(f"unknown BST variant {variant!r}; use one of {', '.join(VARIANTS)}")
        if kernel not in KERNELS:
            raise ConfigError(f"unknown SSM kernel {kernel!r}; use s4 or unstruct")
        if hidden_size % num_attention_heads:
            raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_attention_heads "
                              f"{num_attention_heads}; pick sizes whose head dimension is whole")
        if (hidden_size // num_attention_heads) % 2:
            raise ConfigError("the head dimension must be even for rotary embeddings")
        kv_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if kv_heads < 1 or num_attention_heads % kv_heads:
            raise ConfigError(f"num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads}; pick a divisor")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if state_size < 2 or state_size % 2:
            raise ConfigError(f"state_size must be an even number >= 2 (S4D keeps complex-conjugate pairs), "
                              f"got {state_size}")
        if mf_states < 1 or filter_length < 1:
            raise ConfigError("mf_states and filter_length must be >= 1")
        if ssm_dtype != "float32":
            raise ConfigError(f"ssm_dtype {ssm_dtype!r} is not supported: SSM states and FFTs run in float32 "
                              "(half-precision FFTs lose the long kernel's tail); the rest may use bf16 autocast")
        layers = [num_hidden_layers // 2] if ssm_layers is None else list(ssm_layers)
        if any(not 0 <= i < num_hidden_layers for i in layers):
            raise ConfigError(f"ssm_layers {layers} must be in [0, {num_hidden_layers})")
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = kv_heads
        self.intermediate_size, self.block_size = intermediate_size, block_size
        self.variant, self.kernel, self.state_size, self.mf_states = variant, kernel, state_size, mf_states
        self.ssm_layers = layers if variant in ("sh", "mh", "mf") else []
        self.filter_length, self.ssm_dtype = filter_length, ssm_dtype
        self.rope_theta, self.rms_norm_eps, self.initializer_range = rope_theta, rms_norm_eps, initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_preset(cls, preset: str, vocab_size: int, **kwargs: Any) -> BSTConfig:
        """A BST config at the width, depth, heads and FFN size of a named base-model preset (equal-size
        comparisons with the Llama models)."""
        from msrnn.models.presets import PRESETS

        p = PRESETS.get(preset)()
        return cls(vocab_size=vocab_size, hidden_size=p.hidden_size, num_hidden_layers=p.num_layers,
                   num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
                   intermediate_size=p.intermediate_size, **kwargs)

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_attention_heads

    @property
    def name(self) -> str:
        """A label such as ``BST:SH:S4``."""
        if self.variant in ("slide", "full"):
            return self.variant.upper()
        return f"BST:{self.variant.upper()}:{'S4' if self.kernel == 's4' else 'UNSTRUCT'}"
