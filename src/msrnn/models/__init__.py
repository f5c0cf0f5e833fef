"""Base models: Llama-architecture presets and the adapter that makes any HF causal LM a StatefulLM."""

from msrnn.models.hf import HFCausalLM, HFState
from msrnn.models.loading import load_lm, load_tokenizer_for
from msrnn.models.presets import PRESETS, build_model, preset_config

__all__ = [
    "HFCausalLM",
    "HFState",
    "PRESETS",
    "build_model",
    "load_lm",
    "load_tokenizer_for",
    "preset_config",
]
