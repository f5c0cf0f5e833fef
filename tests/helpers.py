"""Test helpers: one assert_close (max-abs and relative-RMS error, fails on NaN) and tiny random models."""

from __future__ import annotations

import torch


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, atol: float = 1e-5, rtol: float = 0.0) -> None:
    ref, out = ref.detach().double(), out.detach().double()
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: output has NaN"
    err = (ref - out).abs()
    rel_rms = (err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    bound = atol + rtol * ref.abs()
    assert bool((err <= bound).all()), (
        f"{name}: max abs err {err.max().item():.3e} (rel rms {rel_rms:.3e}) > atol {atol}"
    )


V = 384


def tiny(arch: str, attn: str = "sdpa", seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=V, hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = MistralConfig(**common, sliding_window=None), MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    elif arch == "gpt2":
        cfg, cls = GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=512), GPT2LMHeadModel
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(cfg).eval()


def assert_pipeline_generates(model, tokenizer, folder) -> None:
    """Save ``model`` with ``tokenizer`` and run transformers' text-generation pipeline on the directory."""
    from transformers import pipeline

    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    out = pipeline("text-generation", model=str(folder), device="cpu")("def f(x):", max_new_tokens=6, do_sample=False)
    assert out[0]["generated_text"].startswith("def f(x):")


def assert_generate_follows_protocol(model, lm, x, new_tokens: int = 12) -> None:
    """``model.generate`` (greedy) gives the tokens of ``msrnn.generate`` on the protocol adapter ``lm``, returns
    its state in a StateCache, and refuses a padded batch (pad tokens would enter the recurrent state)."""
    import pytest

    from msrnn.compat import output_cache
    from msrnn.errors import ConfigError
    from msrnn.generate import generate
    from msrnn.models.state_cache import StateCache

    T = x.shape[1]
    with torch.no_grad():
        want = generate(lm, x, max_new_tokens=new_tokens)
        got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        out = model(x, use_cache=True)
    assert torch.equal(got[:, T:], want)
    assert isinstance(output_cache(out), StateCache) and output_cache(out).get_seq_length() == T
    with pytest.raises(ConfigError, match="padding"):
        model.generate(x, attention_mask=torch.ones_like(x).index_fill_(1, torch.tensor([0]), 0), max_new_tokens=2)
