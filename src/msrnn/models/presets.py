"""Named Llama-architecture presets (zero-argument builders, as torchtune does it).

GQA is on in every preset (fewer KV heads than query heads) so every family is exercised against it.
Embeddings are tied: at a 4096-token vocabulary an untied head would be a quarter of the ``small`` model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import LlamaConfig, LlamaForCausalLM

from msrnn.errors import ConfigError
from msrnn.registry import Registry


@dataclass(frozen=True)
class Preset:
    """Architecture hyper-parameters of a named base model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


PRESETS: Registry[Callable[[], Preset]] = Registry("preset")


@PRESETS.register("tiny", "2 layers, d=64, 4/2 heads: well under 1M params, for tests")
def tiny() -> Preset:
    """A 2-layer Llama for tests."""
    return Preset(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=160)


@PRESETS.register("small", "4 layers, d=256, 4/2 heads: ~4M params, minutes of CPU training")
def small() -> Preset:
    """The 4-layer, d = 256 Llama the README trains."""
    return Preset(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688)


@PRESETS.register("base", "12 layers, d=768, 12/4 heads: ~100M params, for a GPU")
def base() -> Preset:
    """A 12-layer, d = 768 Llama."""
    return Preset(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2816)


# Real models' shapes, for benchmarks of speed and memory (random weights; a reduced vocabulary is enough there).
# Deviations: the Llama architecture throughout (Qwen2's QKV biases and Llama 3.2's RoPE scaling are left out:
# neither changes the bytes moved or the FLOPs of a step measurably).
@PRESETS.register("qwen2.5-0.5b", "Qwen2.5-0.5B's shape: 24 layers, d=896, 14/2 heads, FFN 4864 (benchmarks)")
def qwen25_05b() -> Preset:
    """The layer, width and head shape of Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B)."""
    return Preset(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                  max_positions=32768, rope_theta=1e6)


@PRESETS.register("llama-3.2-1b", "Llama-3.2-1B's shape: 16 layers, d=2048, 32/8 heads, FFN 8192 (benchmarks)")
def llama32_1b() -> Preset:
    """The layer, width and head shape of Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B)."""
    return Preset(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                  max_positions=131072, rope_theta=5e5)


@PRESETS.register("mistral-7b", "Mistral-7B's shape: 32 layers, d=4096, 32/8 heads, FFN 14336 (memory benchmarks)")
def mistral_7b() -> Preset:
    """The layer, width and head shape of Mistral-7B-v0.1 (its config.json; untied head; no sliding window)."""
    return Preset(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                  max_positions=32768, rope_theta=1e4, tie_embeddings=False)


def preset_config(name: str, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None,
                  attn_implementation: str = "sdpa") -> LlamaConfig:
    """The ``LlamaConfig`` of preset ``name`` for a tokenizer of ``vocab_size`` tokens."""
    if vocab_size < 2:
        raise ConfigError(f"vocab_size must be >= 2, got {vocab_size}")
    p = PRESETS.get(name)()
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=p.max_positions,
        rope_theta=p.rope_theta,
        tie_word_embeddings=p.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def build_model(name: str, vocab_size: int, seed: int = 0, **kwargs) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of preset ``name`` (deterministic in ``seed``)."""
    import torch

    cfg = preset_config(name, vocab_size, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model
