"""SUPRA model: conversion keeps every original tensor, all forms agree, generate/save/load work, bad input errors."""

import pytest
import torch
from helpers import V, assert_close, assert_pipeline_generates, tiny

from msrnn.compat import cache_kwargs
from msrnn.errors import ConfigError, ModelLoadError
from msrnn.protocol import stream_logits
from msrnn.supra import SupraCache, SupraConfig, SupraForCausalLM, SupraLM, convert


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_conversion_copies_every_original_tensor_bit_exact(arch):
    base = tiny(arch, seed=3)
    supra = convert(base)
    src, dst = base.state_dict(), supra.state_dict()
    for name, t in src.items():
        assert torch.equal(dst[name], t), name
    new = sorted(set(dst) - set(src))
    assert new and all(".phi_" in n for n in new)  # only the feature maps are new


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_folder_converts_tensor_by_tensor_to_the_same_model(tmp_path, arch, dtype):
    """convert_dir streams the stored tensors into a SUPRA model built in the checkpoint's dtype: the same tensors
    as converting the loaded model (the feature maps' random init included)."""
    from msrnn.models.loading import load_hf_causal_lm
    from msrnn.supra.convert import convert_dir

    base = tiny(arch, seed=3).to(dtype)
    base.save_pretrained(tmp_path / "base")
    streamed = convert_dir(tmp_path / "base", seed=5)
    whole = convert(load_hf_causal_lm(tmp_path / "base"), seed=5)
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == dtype and torch.equal(a[k], b[k]), k


def test_a_tied_folder_streams_and_a_folder_that_does_not_map_is_loaded_whole(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from msrnn.supra.convert import convert_dir

    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "tied")
    supra = convert_dir(tmp_path / "tied")
    assert supra.lm_head.weight is supra.model.embed_tokens.weight
    assert torch.equal(supra.model.embed_tokens.weight, tied.model.embed_tokens.weight)
    # A stored name the model does not have (a renamed or extra tensor): not streamed, the caller loads it whole.
    weights = load_file(tmp_path / "tied" / "model.safetensors")
    save_file({**weights, "extra.weight": torch.zeros(2)}, tmp_path / "tied" / "model.safetensors",
              metadata={"format": "pt"})
    assert convert_dir(tmp_path / "tied") is None


@pytest.mark.parametrize("feature_map", ["dense", "per_head"])
@pytest.mark.parametrize("decay", ["lightning", "retnet", "none"])
def test_streaming_and_generate_equal_full_forward(feature_map, decay):
    model = convert(tiny("llama", seed=1), decay=decay, feature_map=feature_map)
    model.config.linear_chunk_size = 16  # several chunks inside the 63-token forward
    x = torch.randint(0, V, (2, 63))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        lm = SupraLM(model)
        for chunks in (1, 7, [5, 13, 1, 44]):
            assert_close(f"stream {chunks}", full, stream_logits(lm, x, chunks), atol=1e-5)
        # generate = prefill + token-by-token decoding through the cache; greedy must follow the full forward
        out = model.generate(x[:, :20], attention_mask=torch.ones(2, 20, dtype=torch.long), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)
        seq = x[:, :20]
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_state_bytes_constant_and_fp32():
    lm = SupraLM(convert(tiny("llama")))
    state = lm.init_state(1)
    sizes = []
    with torch.no_grad():
        for n in (5, 50, 1, 200):
            _, state = lm.forward_chunk(torch.randint(0, V, (1, n)), state)
            sizes.append(lm.state_nbytes(state))
    H, d = 4, 16
    assert sizes == [2 * H * d * d * 4] * 4  # 2 layers x [1, H, d, d] fp32, whatever the length
    assert all(layer.state.dtype == torch.float32 for layer in state.cache.layers)


def test_gradients_flow_through_chunked_form():
    model = convert(tiny("llama")).train()
    x = torch.randint(0, V, (2, 40))
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    phi = model.model.layers[0].self_attn.phi_q.proj.weight
    assert phi.grad is not None and phi.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = convert(tiny("mistral"), decay="retnet")
    model.save_pretrained(tmp_path / "m")
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "msrnn_supra"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, SupraForCausalLM) and loaded.config.decay == "retnet"
    x = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        assert torch.equal(model(x, use_cache=False).logits, loaded(x, use_cache=False).logits)


def test_bad_input():
    with pytest.raises(ModelLoadError, match="already a SUPRA model"):
        convert(convert(tiny("llama")))
    with pytest.raises(ModelLoadError, match="supports llama, mistral, qwen2"):
        convert(tiny("gpt2"))
    with pytest.raises(ConfigError, match="unknown decay schedule"):
        convert(tiny("llama"), decay="cosine")
    with pytest.raises(ConfigError, match="not divisible"):
        SupraConfig(hidden_size=60, num_attention_heads=8)
    with pytest.raises(ConfigError, match="odd"):
        SupraConfig(hidden_size=60, num_attention_heads=4, num_key_value_heads=4)
    with pytest.warns(UserWarning, match="float32"):
        assert SupraConfig(state_dtype="float16").state_dtype == "float32"
    model = convert(tiny("llama"))
    with pytest.raises(ConfigError, match="padding"):
        model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ConfigError, match="SupraCache"):
        model(torch.ones(1, 4, dtype=torch.long), **cache_kwargs(SupraCache(2).__class__.__mro__[1](layers=[])))


def test_cli_convert_train_eval(tmp_path, tiny_corpus, capsys):
    import json

    from msrnn.cli.main import main

    base = tmp_path / "base"
    assert main(["pretrain", "--preset", "tiny", "--data", str(tiny_corpus), "--vocab-size", "320", "--max-steps",
                 "2", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--out", str(base), "--quiet",
                 "--json"]) == 0
    capsys.readouterr()
    conv = tmp_path / "supra"
    assert main(["convert", "supra", "--from", str(base), "--out", str(conv), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["params"] > 0 and res["streamed"]
    assert main(["convert", "supra", "--from", str(conv), "--out", str(tmp_path / "again")]) == 2
    assert "already a SUPRA model" in capsys.readouterr().err
    up = tmp_path / "up"
    assert main(["train", "supra", "--from", str(conv), "--out", str(up), "--data", str(tiny_corpus),
                 "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--quiet",
                 "--json"]) == 0
    capsys.readouterr()
    assert json.loads((up / "msrnn.json").read_text())["packing"]["layout"] == "packed"  # it resets its state
    results = []
    for n in ("40", "120"):
        assert main(["eval", "ppl", "--model", str(up), "--data", f"{tiny_corpus}:all", "--max-tokens", n,
                     "--max-docs", "2", "--chunk-size", "16", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["peak_state_bytes"] == results[1]["peak_state_bytes"] > 0  # constant in --max-tokens
    assert main(["train", "supra", "--from", str(base), "--out", str(tmp_path / "x")]) == 2
    assert "not a SUPRA model directory" in capsys.readouterr().err


def test_supra_bench_plumbing():
    from msrnn.bench.supra import bench_decode, bench_ops

    ops = bench_ops([16, 64], heads=2, dim=8, rounds=1)
    assert [r["T"] for r in ops["rows"]] == [16, 64] and all(r["chunked vs naive"] > 0 for r in ops["rows"])
    dec = bench_decode(convert(tiny("llama")), [8, 40], steps=2, rounds=1, prefill_chunk=16)
    assert dec["rows"][0]["state bytes"] == dec["rows"][1]["state bytes"] > 0


@pytest.mark.parametrize("feature_dim,feature_map", [(6, "dense"), (24, "per_head")])
def test_feature_dim_sizes_the_state_and_all_forms_agree(feature_dim, feature_map):
    model = convert(tiny("llama", seed=2), feature_map=feature_map, feature_dim=feature_dim)
    model.config.linear_chunk_size = 16
    lm = SupraLM(model)
    x = torch.randint(0, V, (2, 63))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        for chunks in (1, [5, 13, 1, 44]):
            assert_close(f"stream {chunks}", full, stream_logits(lm, x, chunks), atol=1e-5)
        state = lm.init_state(1)
        _, state = lm.forward_chunk(x[:1], state)
        # RoPE at width F is a rotation of relative distance: shifting every position changes nothing
        shifted = model(x, position_ids=torch.arange(63)[None] + 100, use_cache=False).logits
    assert_close("position shift", full, shifted, atol=1e-4)
    H, d, layers = 4, 16, 2
    assert lm.state_nbytes(state) == layers * H * feature_dim * d * 4


def test_feature_rope_equals_the_models_rope_at_head_dim():
    model = convert(tiny("llama"), feature_dim=16)  # = head_dim: the attention's own table must be the model's
    attn = model.model.layers[0].self_attn
    pos = torch.arange(37)[None] + 5
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    mine = attn._rope(pos, 1, 37, torch.device("cpu"), torch.float32)
    assert_close("cos", cos, mine[0], atol=1e-6)
    assert_close("sin", sin, mine[1], atol=1e-6)
    with pytest.raises(ConfigError, match="feature_dim must be an even"):
        convert(tiny("llama"), feature_dim=7)


def test_generate_and_pipeline_follow_msrnn_generate(tmp_path, task_tokenizer):
    """SUPRA's generate() (its SupraCache) gives the greedy tokens of `msrnn generate`; pipeline runs on a saved
    directory."""
    from msrnn.generate import generate

    model = convert(tiny("llama", seed=3)).eval()
    x = torch.randint(1, V, (2, 11))
    with torch.no_grad():
        want = generate(SupraLM(model), x, max_new_tokens=10)
        got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got[:, 11:], want)
    assert_pipeline_generates(model, task_tokenizer, tmp_path / "m")
