"""Block-State Transformer: streaming equals the parallel forward for every variant, context flows where each
variant says it does, the state is constant, save/load round-trips, bad configs get clear errors."""

import pytest
import torch
from helpers import assert_close, assert_generate_follows_protocol, assert_pipeline_generates

from msrnn.bst import BSTLM, BSTConfig, BSTForCausalLM
from msrnn.errors import ConfigError
from msrnn.protocol import stream_logits

V = 97
CASES = [("sh", "s4"), ("mh", "s4"), ("mf", "s4"), ("sh", "unstruct"), ("mf", "unstruct"), ("slide", "s4"),
         ("full", "s4")]


def make(variant="sh", kernel="s4", W=8, layers=2, ssm_layers=(0,), seed=0):
    torch.manual_seed(seed)
    cfg = BSTConfig(vocab_size=V, hidden_size=60, num_hidden_layers=layers, num_attention_heads=3,
                    intermediate_size=64, block_size=W, variant=variant, kernel=kernel, state_size=6, mf_states=3,
                    filter_length=20, ssm_layers=list(ssm_layers))
    return BSTForCausalLM(cfg).eval()


@pytest.mark.parametrize("variant,kernel", CASES)
@pytest.mark.parametrize("chunk", [1, 5, 8, 63])
def test_streaming_equals_parallel_at_odd_lengths(variant, kernel, chunk):
    m = make(variant, kernel)
    x = torch.randint(0, V, (2, 63))  # W = 8 does not divide 63: the parallel form pads
    with torch.no_grad():
        assert_close(f"{variant}:{kernel} chunk {chunk}", m(x).logits, stream_logits(BSTLM(m), x, chunk), atol=1e-5)


def test_block_larger_than_the_sequence():
    m = make("sh", W=64)
    x = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert_close("W > L", m(x).logits, stream_logits(BSTLM(m), x, 2), atol=1e-5)


def _influence(m, src, dst, T=48):
    """Does changing token `src` change the logits at `dst`?"""
    x = torch.randint(0, V, (1, T))
    y = x.clone()
    y[0, src] = (x[0, src] + 1) % V
    with torch.no_grad():
        return not torch.allclose(m(x).logits[0, dst], m(y).logits[0, dst], atol=1e-6)


@pytest.mark.parametrize("variant", ["sh", "mh", "mf"])
def test_the_ssm_carries_context_across_blocks(variant):
    m = make(variant, W=8)
    assert _influence(m, 0, 47)  # block 0 reaches block 5 only through the SSM's context states
    assert not _influence(m, 20, 19)  # and nothing flows backwards


def test_slide_sees_one_block_back_per_layer_and_no_further():
    m = make("slide", W=8, layers=2)
    assert _influence(m, 0, 23)  # block 2: two layers x one block back
    assert not _influence(m, 0, 24)  # block 3 is out of reach without an SSM


def test_unstructured_filter_forgets_beyond_its_taps():
    m = make("sh", "unstruct", W=8, layers=1)  # one layer: context beyond the block comes only from the filter
    assert _influence(m, 0, 19)  # 19 < filter_length = 20
    assert not _influence(m, 0, 40)


@pytest.mark.parametrize("variant,grows", [("sh", False), ("mf", False), ("slide", False), ("full", True)])
def test_state_bytes_constant_except_full_attention(variant, grows):
    lm = BSTLM(make(variant, W=8))
    state, sizes = lm.init_state(1), []
    with torch.no_grad():
        for _ in range(12):
            _, state = lm.forward_chunk(torch.randint(0, V, (1, 8)), state)
            sizes.append(lm.state_nbytes(state))
    assert (sizes[-1] > sizes[0]) == grows
    if not grows:
        assert len(set(sizes[1:])) == 1


def test_ssm_runs_in_fp32_under_bf16_autocast():
    m = make("sh")
    layer = m.layers[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer.ssm.conv(torch.randn(1, 16, 60))
        out = m(torch.randint(0, V, (1, 16))).logits
    assert y.dtype == torch.float32 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kernel", ["s4", "unstruct"])
def test_a_bst_loaded_or_cast_to_bf16_keeps_its_ssm_in_fp32(tmp_path, kernel):
    """from_pretrained(dtype=bf16) and .to(bf16) cast the transformer but not the SSM: its kernel is the fp32 one
    exactly (a bf16 S4D kernel was off by 7.8%)."""
    from transformers import AutoModelForCausalLM

    m = make("sh", kernel=kernel)
    ref = m.layers[0].ssm.kernel.kernel(64)
    m.save_pretrained(tmp_path / "bst")
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "bst", dtype=torch.bfloat16), m.to(torch.bfloat16)):
        assert loaded.embed_tokens.weight.dtype == torch.bfloat16
        assert {p.dtype for n, p in loaded.named_parameters() if ".kernel." in n} == {torch.float32}
        assert torch.equal(loaded.layers[0].ssm.kernel.kernel(64), ref)
        assert torch.isfinite(loaded(torch.randint(0, V, (1, 20))).logits.float()).all()


def test_save_load_round_trip(tmp_path, task_tokenizer):
    from transformers import AutoModelForCausalLM

    from msrnn.models import load_lm

    m = make("mf")
    m.save_pretrained(tmp_path / "bst")
    task_tokenizer.save_pretrained(str(tmp_path / "bst"))
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "bst").eval()
    x = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)
        lm = load_lm(tmp_path / "bst")
        assert isinstance(lm, BSTLM)
        assert_close("loaded stream", m(x).logits, stream_logits(lm, x, 7), atol=1e-5)
    assert m2.lm_head.weight.data_ptr() == m2.embed_tokens.weight.data_ptr()  # tied after loading


@pytest.mark.parametrize("kwargs,msg", [
    ({"state_size": 7}, "state_size must be an even"),
    ({"ssm_dtype": "float16"}, "run in float32"),
    ({"variant": "xl"}, "unknown BST variant"),
    ({"kernel": "fourier"}, "unknown SSM kernel"),
    ({"hidden_size": 62}, "not divisible"),
    ({"ssm_layers": [9]}, "ssm_layers"),
    ({"block_size": 0}, "block_size"),
])
def test_bad_configs(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        BSTConfig(**{"num_attention_heads": 4, **kwargs})


def test_train_bst_cli_and_eval_ppl_any_chunk_size(tmp_path, tiny_corpus, capsys):
    import json

    from msrnn.cli.main import main

    out = tmp_path / "bst"
    rc = main(["train", "bst", "--variant", "sh", "--preset", "tiny", "--data", str(tiny_corpus), "--vocab-size",
               "320", "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--eval-every", "0",
               "--save-every", "0", "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["model"] == "BST:SH:S4"
    packing = json.loads((out / "msrnn.json").read_text())["packing"]  # blocks cannot restart: a row per document
    assert packing["layout"] == "rows" and "refuses position ids" in packing["failed"]
    ppl = []
    for chunk in ("1", "7", "64"):
        assert main(["eval", "ppl", "--model", str(out), "--data", str(tiny_corpus), "--chunk-size", chunk,
                     "--max-tokens", "64", "--max-docs", "2", "--json", "--quiet"]) == 0
        ppl.append(json.loads(capsys.readouterr().out)["ppl"])
    assert max(ppl) - min(ppl) < 1e-3 * ppl[0]
    assert main(["train", "bst", "--variant", "xl", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "unknown BST variant" in capsys.readouterr().err


def test_train_bst_from_a_pretrained_model(tmp_path, tiny_corpus, task_tokenizer, capsys):
    import json

    from helpers import tiny
    from transformers import AutoModelForCausalLM

    from msrnn.cli.main import main

    tiny("llama", seed=2).save_pretrained(tmp_path / "base")
    task_tokenizer.save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "bst"
    assert main(["train", "bst", "--from", str(tmp_path / "base"), "--variant", "mh", "--block-size", "16",
                 "--data", str(tiny_corpus), "--seq-len", "32", "--batch-size", "2", "--max-steps", "1",
                 "--eval-every", "0", "--save-every", "0", "--out", str(out), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "BST:MH:S4"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2 and model.config.hidden_size == 64  # the base model's shape
    assert main(["train", "bst", "--from", str(tmp_path / "base"), "--variant", "sh", "--data", str(tiny_corpus),
                 "--out", str(tmp_path / "x"), "--seq-len", "32", "--max-steps", "1", "--quiet",
                 "--state-size", "3"]) == 2
    assert "state_size must be an even" in capsys.readouterr().err


@pytest.mark.parametrize("variant,kernel", [("sh", "s4"), ("mf", "s4"), ("sh", "unstruct"), ("slide", "s4")])
def test_streaming_and_parallel_gradients_agree(variant, kernel):
    m = make(variant, kernel).train()
    x = torch.randint(0, V, (1, 29))
    w = torch.randn(29, V)
    params = [p for p in m.parameters() if p.requires_grad]
    g_par = torch.autograd.grad((m(x).logits[0] * w).sum(), params, allow_unused=True)
    state = m.init_state(1)
    out = torch.cat([m.step(x[:, :11], state), m.step(x[:, 11:], state)], dim=1)  # cut mid-block
    g_str = torch.autograd.grad((out[0] * w).sum(), params, allow_unused=True)
    compared = 0
    for i, (a, b) in enumerate(zip(g_par, g_str, strict=True)):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert_close(f"{variant}:{kernel} grad {i}", a, b, atol=1e-4, rtol=1e-4)
        compared += 1
    assert compared == len(params)  # every parameter, the SSM's included, gets a gradient on both paths


def make_gqa(variant, W=8, seed=0):
    torch.manual_seed(seed)
    cfg = BSTConfig(vocab_size=V, hidden_size=60, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                    intermediate_size=64, block_size=W, variant=variant, state_size=6, ssm_layers=[1])
    return BSTForCausalLM(cfg).eval()


@pytest.mark.parametrize("variant", ["sh", "mh", "slide", "full"])
def test_grouped_query_attention_streams_like_parallel_and_shrinks_the_state(variant):
    m = make_gqa(variant)
    x = torch.randint(0, V, (2, 63))
    with torch.no_grad():
        for chunk in (1, 5, 63):
            assert_close(f"gqa {variant} chunk {chunk}", m(x).logits, stream_logits(BSTLM(m), x, chunk), atol=1e-5)
    lm = BSTLM(m)
    state = lm.init_state(1)
    with torch.no_grad():
        _, state = lm.forward_chunk(x[:1, :7], state)  # 7 block keys held in every layer
    assert state["layers"][0]["k"].shape[1] == 2  # keys/values held per kv head, not per query head


@pytest.mark.parametrize("variant", ["sh", "mf", "slide", "full"])
def test_from_llama_starts_as_the_base_model(variant):
    from helpers import tiny

    from msrnn.bst import from_llama

    base = tiny("llama", seed=4)
    T = 40
    x = torch.randint(0, 384, (2, T))
    with torch.no_grad():
        ref = base(x).logits
        wide = from_llama(base, variant=variant, block_size=64, state_size=4)  # one block covers the input
        assert_close(f"{variant} W > T", ref, wide(x).logits, atol=1e-4)
        cut = from_llama(base, variant=variant, block_size=16, state_size=4)
        out = cut(x).logits
        # the first block sees what the base sees; later blocks lose keys beyond the block (or the previous one)
        assert_close(f"{variant} first block", ref[:, :16], out[:, :16], atol=1e-4)
        assert torch.allclose(ref[:, 33:], out[:, 33:], atol=1e-4) == (variant == "full")


def test_from_llama_rejects_models_it_cannot_hold():
    from helpers import tiny

    from msrnn.bst import from_llama
    from msrnn.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="qwen2"):
        from_llama(tiny("qwen2"))
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        BSTConfig(num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("variant", ["sh", "slide"])
def test_grouped_query_streaming_and_parallel_gradients_agree(variant):
    m = make_gqa(variant).train()
    x = torch.randint(0, V, (1, 29))
    w = torch.randn(29, V)
    params = list(m.parameters())
    g_par = torch.autograd.grad((m(x).logits[0] * w).sum(), params)
    state = m.init_state(1)
    out = torch.cat([m.step(x[:, :11], state), m.step(x[:, 11:], state)], dim=1)  # cut mid-block
    g_str = torch.autograd.grad((out[0] * w).sum(), params)
    for i, (a, b) in enumerate(zip(g_par, g_str, strict=True)):
        assert_close(f"gqa {variant} grad {i}", a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["sh", "mf", "slide", "full"])
def test_generate_and_pipeline_follow_msrnn_generate(variant, tmp_path, task_tokenizer):
    """generate() carries the streaming state in a StateCache (prefill, then one token per step, across block
    boundaries); greedy output equals `msrnn generate` on the protocol, and pipeline("text-generation") runs."""
    m = make(variant)
    x = torch.randint(0, V, (2, 13))
    assert_generate_follows_protocol(m, BSTLM(m), x)
    with pytest.raises(ConfigError, match="beam search"):
        m.generate(x[:1], num_beams=2, max_new_tokens=3, do_sample=False)
    big = BSTForCausalLM(BSTConfig(vocab_size=len(task_tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, block_size=8, state_size=4,
                                   ssm_layers=[1], variant=variant)).eval()
    assert_pipeline_generates(big, task_tokenizer, tmp_path / "m")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bst_loaded_in_half_precision_streams(tmp_path, dtype):
    """The block caches used to start in fp32, so a bf16/fp16 model's streaming step failed inside SDPA."""
    from msrnn.models.loading import load_hf_causal_lm

    make("sh").save_pretrained(tmp_path / "m")
    ref = load_hf_causal_lm(tmp_path / "m")
    half = load_hf_causal_lm(tmp_path / "m", dtype=dtype)
    x = torch.randint(0, V, (1, 21))
    with torch.no_grad():
        parallel = half(x).logits.float()
        assert_close("stream = parallel", parallel, stream_logits(BSTLM(half), x, 5).float(), atol=1e-6)
        assert_close("half vs fp32", ref(x).logits, parallel, atol=3e-2)
