"""Initialise a Block-State Transformer from a pretrained Llama-style decoder (an uptraining start).

The BST paper trains from scratch. Starting from a pretrained decoder lets ``msrnn compare`` give BST the same
start and the same training tokens as SUPRA and RMT, which adapt that decoder too. Every base tensor lands in the
matching BST tensor (embeddings, norms, q/k/v/o, MLP); the SSM and its cross-attention are new, and the
cross-attention half of each SSM layer's output projection starts at zero, so before training the BST model is
exactly the base model with attention cut at block edges (a test holds this).
"""

from __future__ import annotations

from typing import Any

import torch

from msrnn.bst.config import BSTConfig
from msrnn.bst.modeling import BSTForCausalLM
from msrnn.errors import ModelLoadError
from msrnn.models.hf import rope_theta, rope_type

SUPPORTED = ("llama", "mistral")


def from_llama(model: Any, seed: int = 0, **bst_kwargs: Any) -> BSTForCausalLM:
    """A BSTForCausalLM (``bst_kwargs``: variant, kernel, block_size, state_size, ssm_layers, ...) holding the
    base model's weights."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise ModelLoadError(f"cannot start a BST from a {cfg.model_type!r} model; supported: {', '.join(SUPPORTED)}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ModelLoadError("cannot start a BST from a model with attention or MLP biases (BST has none)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ModelLoadError(f"head_dim {head_dim} x {cfg.num_attention_heads} heads != hidden_size "
                             f"{cfg.hidden_size}; BST needs heads that split the hidden size")
    if rope_type(cfg) != "default":
        raise ModelLoadError(f"the base model uses {rope_type(cfg)!r} RoPE; BST implements the default")
    bst_cfg = BSTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                        num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
                        rope_theta=rope_theta(cfg),
                        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=bool(cfg.tie_word_embeddings),
                        **bst_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bst = BSTForCausalLM(bst_cfg)
    src, d = model.model, cfg.hidden_size
    with torch.no_grad():
        bst.embed_tokens.weight.copy_(src.embed_tokens.weight)
        bst.norm.weight.copy_(src.norm.weight)
        if not cfg.tie_word_embeddings:
            bst.lm_head.weight.copy_(model.lm_head.weight)
        for mine, theirs in zip(bst.layers, src.layers, strict=True):
            attn, mlp = theirs.self_attn, theirs.mlp
            mine.norm1.weight.copy_(theirs.input_layernorm.weight)
            mine.norm2.weight.copy_(theirs.post_attention_layernorm.weight)
            mine.q.weight.copy_(attn.q_proj.weight)
            mine.k.weight.copy_(attn.k_proj.weight)
            mine.v.weight.copy_(attn.v_proj.weight)
            mine.o.weight.zero_()
            mine.o.weight[:, :d].copy_(attn.o_proj.weight)  # [d, d] or [d, 2d]: the context half starts at zero
            mine.mlp.gate.weight.copy_(mlp.gate_proj.weight)
            mine.mlp.up.weight.copy_(mlp.up_proj.weight)
            mine.mlp.down.weight.copy_(mlp.down_proj.weight)
    if bst_cfg.tie_word_embeddings:
        bst.tie_weights()
    return bst.to(next(model.parameters()).dtype).eval()
