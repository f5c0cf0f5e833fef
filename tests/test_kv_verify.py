"""Verification before eviction (msrnn.kv.verify): every decoder type transformers ships is verified exact or refused
with a named reason; the checks can fail; verdicts are cached; rolling positions follow each layer's own RoPE;
attention sinks are honoured; `msrnn doctor` reports it all; folders never run code."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from helpers import V, assert_close, tiny

from msrnn.compat import cache_kwargs
from msrnn.errors import ModelLoadError
from msrnn.kv import KVEvictionLM, make_cache, make_policy, prepare_model, verify
from msrnn.protocol import stream_logits

# Decoder types that must be verified wherever this transformers can build them tiny, and the named reason for
# each type that must be refused (the cases: chunked attention, several attention calls per layer, ALiBi,
# latent caches, local attention windows, recurrent layers).
MUST_VERIFY = {"llama", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "gpt_neox", "gpt2", "mixtral", "starcoder2",
               "stablelm", "biogpt", "smollm3", "glm", "glm4", "cohere", "helium", "granite", "opt", "ernie4_5"}
# DiffLlama: on 5.25 it calls the attention function twice per layer; on 5.4 its attention bypasses the registry.
MUST_REFUSE = {"llama4_text": "chunked attention", "diffllama": "more than once per layer|attention-function registry",
               "bloom": "ALiBi",
               "mpt": "ALiBi", "deepseek_v2": "latent", "deepseek_v3": "latent", "gpt_neo": "local attention",
               "qwen3_next": "non-attention layers", "mistral": "sliding window"}
ROLLING = {"smollm3": {"half", "none"}, "glm": {"interleaved"}, "cohere": {"interleaved"}, "helium": {"interleaved"},
           "llama": {"half"}}


@pytest.fixture
def fresh_verdicts(monkeypatch, tmp_path):
    """An empty verdict cache (memory and disk), so a test's monkeypatches are what gets verified."""
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verify, "_MEMORY", {})
    return tmp_path / "cache" / "verified"


@pytest.mark.slow
def test_every_causal_lm_type_is_verified_or_refused_by_name():
    """The sweep behind the README's architecture table (benchmarks/kv_architectures.py prints it)."""
    types = verify.causal_lm_types()
    assert len(types) > 100
    results = {t: verify.check_architecture(t) for t in types}
    for t, r in results.items():
        assert r.outcome in ("verified", "refused", "not built"), (t, r)
        if r.outcome != "verified":
            assert r.reason and "\n" not in r.reason and "Traceback" not in r.reason, (t, r.reason)
    built = {t for t, r in results.items() if r.outcome != "not built"}
    for t in MUST_VERIFY & built:
        assert results[t].outcome == "verified", (t, results[t].reason)
    for t, reason in MUST_REFUSE.items():
        if t in built:
            assert results[t].outcome == "refused" and re.search(reason, results[t].reason), (t, results[t].reason)
    for t, layouts in ROLLING.items():
        if t in built:
            assert results[t].rolling == f"yes ({', '.join(sorted(layouts))})", (t, results[t].rolling)
    verified = sum(r.outcome == "verified" for r in results.values())
    assert verified >= 40, verified


def test_a_check_that_fails_refuses_the_model_naming_it(monkeypatch, fresh_verdicts):
    """Verification is not vacuous: a 1e-2 error in the fast exact prefill is caught and named."""
    from msrnn.kv import attention

    real = attention._exact

    def off_by_a_little(*args, **kwargs):
        out, keep = real(*args, **kwargs)
        return out + 1e-2, keep

    monkeypatch.setattr(attention, "_exact", off_by_a_little)
    model = tiny("llama", seed=5)
    verdict = verify.verdict_for(model)
    assert not verdict.ok and "check 'chunk-invariance' failed" in verdict.reason
    with pytest.raises(ModelLoadError, match="chunk-invariance"):
        prepare_model(model)
    with pytest.raises(ModelLoadError, match="chunk-invariance"):
        KVEvictionLM(model, make_policy("tova", 8))


def test_verdicts_are_cached_on_disk_and_a_damaged_entry_is_recomputed(monkeypatch, fresh_verdicts):
    model = tiny("qwen2", seed=1)
    first = verify.verdict_for(model)
    assert first.ok and (fresh_verdicts / f"{first.key}.json").exists()
    assert set(verify.CHECKS) <= set(first.checks)
    monkeypatch.setattr(verify, "_MEMORY", {})
    monkeypatch.setattr(verify, "_verify_twin", lambda *a: pytest.fail("re-verified a cached verdict"))
    assert verify.verdict_for(model).checks == first.checks
    (fresh_verdicts / f"{first.key}.json").write_text("{not json")
    monkeypatch.setattr(verify, "_MEMORY", {})
    monkeypatch.undo()  # the real _verify_twin again, same cache folder
    monkeypatch.setenv("MSRNN_CACHE", str(fresh_verdicts.parent))
    monkeypatch.setattr(verify, "_MEMORY", {})
    assert verify.verdict_for(model).ok
    assert json.loads((fresh_verdicts / f"{first.key}.json").read_text())["ok"] is True


def test_the_key_changes_with_what_attention_depends_on():
    a = tiny("llama", seed=1)
    b = tiny("llama", seed=2)  # other weights, same class and config: one verdict
    assert verify.verdict_for(a).key == verify.verdict_for(b).key
    c = tiny("llama", attn="eager")
    assert verify.verdict_for(c).key != verify.verdict_for(a).key


def _one_layer(cfg_name: str, model_name: str, **extra):
    cfg = getattr(transformers, cfg_name)(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(3)
    return getattr(transformers, model_name)(cfg).eval()


ONE_LAYER = {
    "llama-half": lambda: _one_layer("LlamaConfig", "LlamaForCausalLM"),
    "glm-interleaved": lambda: _one_layer("GlmConfig", "GlmForCausalLM", head_dim=16),
    "cohere-interleaved": lambda: _one_layer("CohereConfig", "CohereForCausalLM"),
    "smollm3-nope": lambda: _one_layer("SmolLM3Config", "SmolLM3ForCausalLM", no_rope_layers=[0],
                                       use_sliding_window=False, sliding_window=None),
}


@pytest.mark.parametrize("name", sorted(ONE_LAYER))
def test_rolling_positions_equal_a_plain_forward_of_the_kept_tokens(name):
    """With one layer, keys and values depend only on a token and its position, so StreamingLLM's rolling positions
    (kept tokens at 0..k-1, the new one at k) must equal a plain forward of the kept tokens and the new one. Covers
    the half and interleaved channel layouts and a layer without RoPE."""
    try:
        model = ONE_LAYER[name]()
    except (AttributeError, TypeError, ValueError) as exc:
        pytest.skip(f"this transformers cannot build it: {exc}")
    x = torch.randint(1, V, (1, 15))
    lm = KVEvictionLM(model, make_policy("sink", 6, sinks=2), positions="rolling")
    state = lm.init_state(1)
    with torch.no_grad():
        _, state = lm.forward_chunk(x[:, :-1], state)
        kept = state.cache.kept_positions(0)[0, 0].tolist()
        assert kept == [0, 1, 10, 11, 12, 13]  # two sinks, then the newest: a gap the rotation must close
        got, _ = lm.forward_chunk(x[:, -1:], state)
        want = model(x[:, kept + [14]]).logits[:, -1:]
    assert_close(f"{name}: rolling", want, got, atol=2e-4)


def test_attention_sinks_are_honoured():
    """gpt-oss passes per-head sink logits (s_aux) to the attention function: msrnn's functions take them into the
    softmax, so switching to them alone changes nothing and every check holds (they used to drop the sinks)."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    cfg = transformers.GptOssConfig(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, layer_types=["full_attention"] * 2, sliding_window=4096,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.sinks.normal_(0, 2.0)  # sinks that matter
        x = torch.randint(1, V, (1, 20))
        ref = model(x).logits
        prepare_model(model)
        assert_close("prepare_model alone", ref, model(x).logits, atol=1e-5)
        assert_close("budget >= length", ref, stream_logits(KVEvictionLM(model, make_policy("tova", 64)), x, 6),
                     atol=1e-4)
        one = stream_logits(KVEvictionLM(model, make_policy("tova", 6)), x, 1)
        assert_close("sinks under eviction: chunks = token by token", one,
                     stream_logits(KVEvictionLM(model, make_policy("tova", 6)), x, 7), atol=1e-4)
    assert verify.verdict_for(model).ok


def test_rolling_is_refused_naming_the_check_where_no_rotation_fits():
    model = tiny("gpt2")  # learned absolute positions: nothing to re-rotate
    with pytest.raises(Exception, match="positions='rolling' is refused for gpt2: check 'rolling' failed"):
        KVEvictionLM(model, make_policy("sink", 6, sinks=2), positions="rolling")
    KVEvictionLM(model, make_policy("sink", 6, sinks=2))  # original positions are verified


def test_generate_path_is_verified_too():
    """prepare_model -> make_cache -> generate (the path the old version gate missed) runs verification."""
    model = tiny("llama", seed=4)
    prepare_model(model)
    x = torch.randint(1, V, (1, 8))
    out = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         **cache_kwargs(make_cache(model, make_policy("tova", 6)), model))
    assert out.shape == (1, 12)


def test_doctor_reports_every_check_as_json(capsys, tmp_path):
    from msrnn.cli.main import main

    folder = tmp_path / "qwen"
    tiny("qwen2").save_pretrained(folder)  # only config.json is read
    assert main(["doctor", "--json", "--quiet", "--model", str(folder)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    results = {(r["subject"], r["check"]): r["result"] for r in rows}
    assert results[("kv: tiny Llama", "KV eviction")] == "ok (verified)"
    assert results[(f"kv: {folder}", "KV eviction")] == "ok (verified)"
    assert results[(f"kv: {folder}", "kv: chunk-invariance")] == "ok"
    for family in ("supra", "bst", "rmt"):
        for check in ("chunks equal token by token", "generate() equals msrnn generate", "the state advances"):
            assert results[(family, check)] == "ok", (family, check)
    assert all(r["result"] == "ok" for r in rows if r["subject"] == "transformers contract")


def test_a_folder_that_asks_to_run_its_own_code_is_refused(tmp_path, capsys):
    """`auto_map` in config.json or tokenizer_config.json makes transformers import the folder's Python (after a
    y/N prompt in a terminal); msrnn refuses such folders in one line and never passes trust_remote_code."""
    from msrnn.cli.main import main
    from msrnn.models.loading import load_lm, load_tokenizer_for

    folder = tmp_path / "m"
    tiny("llama").save_pretrained(folder)
    (folder / "evil.py").write_text("open('PWNED', 'w').write('x')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="never runs code from a model folder"):
        load_lm(folder)
    assert main(["eval", "ppl", "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msrnn: error:") and "auto_map" in err and "\n" not in err
    assert main(["doctor", "--model", str(folder), "--quiet"]) == 2
    tok = tmp_path / "t"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        load_tokenizer_for(tok)
    assert not (tmp_path / "PWNED").exists()


def test_msrnn_families_are_self_checked_before_loading(monkeypatch, fresh_verdicts, tmp_path):
    """SUPRA/BST/RMT get the same treatment as KV: verified once per installed versions (cached), refused by name
    when a check fails on this transformers."""
    from msrnn.families import FAMILIES
    from msrnn.models import load_lm, selfcheck
    from msrnn.supra import convert

    monkeypatch.setattr(selfcheck, "_MEMORY", {})
    for family in ("supra", "bst", "rmt"):
        assert set(selfcheck.family_checks(FAMILIES.get(family)).values()) == {"ok"}, family
    assert len(list(fresh_verdicts.glob("family-*.json"))) == 3
    folder = tmp_path / "s"
    convert(tiny("llama")).save_pretrained(folder)

    def broken(model, lm):
        raise AssertionError("the state stayed where it was")

    monkeypatch.setattr(selfcheck, "_MEMORY", {})
    monkeypatch.setitem(selfcheck._RUN, "state", broken)
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(ModelLoadError, match="supra family is not verified .* check 'the state advances'"):
        load_lm(folder)
