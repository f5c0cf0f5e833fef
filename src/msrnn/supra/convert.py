"""Turn a pretrained Llama / Mistral / Qwen2 causal LM into a SupraForCausalLM, copying every original tensor."""

from __future__ import annotations

from typing import Any

import torch

from msrnn.errors import ModelLoadError
from msrnn.supra.modeling import SupraConfig, SupraForCausalLM

SUPPORTED = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True, "o_bias": False}}


def supra_config(cfg: Any, decay: str = "lightning", feature_map: str = "dense",
                 feature_dim: int | None = None) -> SupraConfig:
    """The SUPRA config of a softmax model's config (its shape, with SUPRA's attention settings)."""
    if cfg.model_type == SupraConfig.model_type:
        raise ModelLoadError("this model is already a SUPRA model; convert the original softmax model instead")
    if cfg.model_type not in SUPPORTED:
        raise ModelLoadError(f"cannot convert a {cfg.model_type!r} model; SUPRA conversion supports "
                             f"{', '.join(sorted(SUPPORTED))}")
    base = cfg.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "sliding_window",
                "use_sliding_window", "max_window_layers", "layer_types"):
        base.pop(key, None)
    return SupraConfig(decay=decay, feature_map=feature_map, feature_dim=feature_dim,
                       **SUPPORTED[cfg.model_type], **base)


def convert(model: Any, decay: str = "lightning", feature_map: str = "dense", seed: int = 0,
            feature_dim: int | None = None) -> SupraForCausalLM:
    """A SUPRA model with the base model's embeddings, norms, MLPs and q/k/v/o; phi is new (default init).

    ``feature_dim`` (default: the head dimension) is phi's width per head; the state is [H, feature_dim,
    head_dim] per layer, so it sets the state's size (``msrnn compare`` sizes SUPRA to a byte budget with it)."""
    cfg = model.config
    new_cfg = supra_config(cfg, decay, feature_map, feature_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        supra = SupraForCausalLM(new_cfg)
    source = model.state_dict()
    target = supra.state_dict()
    missing = [k for k in source if k not in target]
    if missing:
        raise ModelLoadError(f"cannot place base weights {missing[:3]} in the SUPRA model; unsupported variant")
    with torch.no_grad():
        for name, tensor in source.items():
            if target[name].shape != tensor.shape:
                raise ModelLoadError(f"shape mismatch for {name}: {tuple(tensor.shape)} vs {tuple(target[name].shape)}")
            target[name].copy_(tensor)
    supra.load_state_dict(target)
    if getattr(cfg, "tie_word_embeddings", False):
        supra.tie_weights()
    return supra.to(next(model.parameters()).dtype).eval()
