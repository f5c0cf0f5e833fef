import math

import numpy as np
import pytest
import torch

from msrnn.errors import ConfigError, DataError
from msrnn.evaluate import StreamEvalConfig, evaluate_stream
from msrnn.models import HFCausalLM


def independent_nll(model, doc):
    """Token i scored from a single full forward: -log p(x_i | x_<i) for i >= 1."""
    with torch.no_grad():
        logits = model(torch.tensor([doc])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    return -logp.gather(1, torch.tensor(doc[1:])[:, None])[:, 0]


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_ppl_equals_exp_mean_nll_of_a_full_forward(tiny_model, chunk):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (63, 20, 2, 41)]
    res = evaluate_stream(HFCausalLM(tiny_model), docs, StreamEvalConfig(chunk_size=chunk, max_tokens=None))
    nll = torch.cat([independent_nll(tiny_model, d) for d in docs])
    assert res.tokens == sum(len(d) - 1 for d in docs) == len(nll)
    assert math.isclose(res.ppl, math.exp(nll.mean().item()), rel_tol=1e-5)
    # Per-position sums: position p collects the NLL of token p of every document long enough.
    per_pos = np.zeros(63)
    for d in docs:
        per_pos[1 : len(d)] += independent_nll(tiny_model, d).numpy()
    np.testing.assert_allclose(res.nll_sum_by_pos, per_pos, rtol=1e-5, atol=1e-6)
    assert res.count_by_pos[0] == 0 and res.count_by_pos[1] == 4 and res.count_by_pos[40] == 2
    assert sum(b["tokens"] for b in res.buckets) == res.tokens
    assert res.nonfinite == 0


def test_peak_state_bytes_and_truncation(tiny_model):
    docs = [list(range(1, 101)), list(range(1, 31))]
    res = evaluate_stream(HFCausalLM(tiny_model), docs, StreamEvalConfig(chunk_size=16, max_tokens=50))
    cfg = tiny_model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert res.peak_state_bytes == 50 * per_token
    assert res.tokens == 49 + 29
    assert res.tokens_per_s > 0


@pytest.mark.parametrize("family", ["bst", "rmt"])
def test_peak_state_bytes_is_the_peak_at_any_offset_even_when_chunks_end_on_boundaries(family):
    """Chunks of 16 end on every 8-token block / segment boundary, where BST and RMT have just dropped their
    keys: the between-chunk maximum misses the in-block peak, and is reported under its own name."""
    from helpers import V, tiny

    from msrnn.protocol import measure_state_bytes

    if family == "bst":
        from msrnn.bst import BSTLM, BSTConfig, BSTForCausalLM

        lm = BSTLM(BSTForCausalLM(BSTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, block_size=8, state_size=4, ssm_layers=[1])).eval())
    else:
        from msrnn.rmt import MemoryWrapper
        from msrnn.rmt.lm import RMTLM

        lm = RMTLM(MemoryWrapper.wrap(tiny("llama"), num_memory_tokens=2, segment_length=8, bptt_depth=-1).eval())
    docs = [torch.randint(0, V, (64,)).tolist()]
    res = evaluate_stream(lm, docs, StreamEvalConfig(chunk_size=16, max_tokens=None))
    assert res.peak_state_bytes == measure_state_bytes(lm, 64) > res.chunk_end_state_bytes
    assert res.to_dict()["chunk_end_state_bytes"] == res.chunk_end_state_bytes


@pytest.mark.parametrize("family", ["full", "kv-exact", "kv-oneshot", "h2o", "supra"])
def test_monotone_families_peak_at_the_last_offset(family):
    """``monotone_state`` lets the evaluator skip the token-by-token profile; check the claim: the state never
    shrinks from one token to the next, and a chunked stream's chunk-end maximum equals the true peak."""
    from helpers import V, tiny

    from msrnn.kv import KVEvictionLM, make_policy
    from msrnn.protocol import state_bytes_profile
    from msrnn.supra import SupraLM, convert

    lm = {"full": lambda: HFCausalLM(tiny("llama")),
          "kv-exact": lambda: KVEvictionLM(tiny("llama"), make_policy("tova", 12)),
          "kv-oneshot": lambda: KVEvictionLM(tiny("llama"), make_policy("tova", 12), prefill="oneshot"),
          "h2o": lambda: KVEvictionLM(tiny("llama"), make_policy("h2o", 12)),
          "supra": lambda: SupraLM(convert(tiny("llama")))}[family]()
    assert lm.monotone_state
    profile = state_bytes_profile(lm, 60)
    assert all(a <= b for a, b in zip(profile, profile[1:], strict=False))
    res = evaluate_stream(lm, [torch.randint(0, V, (60,)).tolist()], StreamEvalConfig(chunk_size=16, max_tokens=None))
    assert res.chunk_end_state_bytes == max(profile)
    if family != "kv-oneshot":
        assert res.peak_state_bytes == max(profile)
    else:
        # One eviction per 16-token chunk: the chunk's 15th token is carried on top of the 12 kept slots, so the
        # true peak is 12 + 15 slots per layer, which neither the chunk ends nor a token-by-token feed shows.
        state = lm.init_state(1)
        with torch.no_grad():
            _, state = lm.forward_chunk(torch.randint(0, V, (1, 12)), state)
        per_slot = sum(sum(t.nbytes for t in (lr.keys, lr.values, lr.positions, lr.valid)) // 12
                       for lr in state.cache.layers)
        other = sum(lr.counter.nbytes for lr in state.cache.layers)
        assert len(state.cache.layers) == 2 and res.peak_state_bytes == per_slot * (12 + 15) + other > max(profile)


def test_an_unknown_cache_is_profiled_not_trusted(tiny_model):
    """A cache handed to HFCausalLM makes no monotone promise, so its peak comes from the token-by-token profile."""
    from transformers import DynamicCache

    assert HFCausalLM(tiny_model).monotone_state
    assert not HFCausalLM(tiny_model, cache_factory=lambda: DynamicCache(config=tiny_model.config)).monotone_state


def test_bad_config_and_empty():
    with pytest.raises(ConfigError, match="chunk size must be >= 1"):
        StreamEvalConfig(chunk_size=0)
    with pytest.raises(DataError, match="no document"):
        evaluate_stream(None, [[1]], StreamEvalConfig())


def test_generate_greedy_matches_full_forward_argmax(tiny_model):
    from msrnn.generate import generate

    lm = HFCausalLM(tiny_model)
    prompt = torch.randint(0, 384, (2, 9))
    new = generate(lm, prompt, max_new_tokens=6, prefill_chunk=4)
    seq = prompt
    for _ in range(6):
        with torch.no_grad():
            nxt = tiny_model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert new.equal(seq[:, 9:])


def test_generate_sampling_is_seeded(tiny_model):
    from msrnn.generate import generate

    lm = HFCausalLM(tiny_model)
    p = torch.randint(0, 384, (1, 5))
    a = generate(lm, p, 12, temperature=1.0, top_k=50, top_p=0.9, seed=1)
    b = generate(lm, p, 12, temperature=1.0, top_k=50, top_p=0.9, seed=1)
    c = generate(lm, p, 12, temperature=1.0, top_k=50, top_p=0.9, seed=2)
    assert a.equal(b) and not a.equal(c)
    with pytest.raises(ConfigError):
        generate(lm, p, 3, top_p=0.0)


def test_sampling_draws_from_the_distribution_transformers_generate_uses():
    """msrnn's sampler warps with transformers' warpers, and they keep what the definitions say: temperature
    scales, top-k keeps the k largest, top-p the smallest prefix (by probability) whose mass reaches p."""
    from msrnn.generate import warp

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 3
    t, k, p = 0.7, 12, 0.8
    got = warp(logits, t, k, p)
    for row, out in zip(logits, got, strict=True):
        z = row / t
        keep = set(z.topk(k).indices.tolist())
        probs = z.masked_fill(~torch.isin(torch.arange(40), torch.tensor(sorted(keep))), float("-inf")).softmax(-1)
        order = probs.argsort(descending=True)
        mass, nucleus = 0.0, []
        for i in order.tolist():
            if mass >= p:
                break
            nucleus.append(i)
            mass += float(probs[i])
        assert set(torch.isfinite(out).nonzero()[:, 0].tolist()) == set(nucleus)
        assert torch.allclose(out[nucleus], z[nucleus])
    assert torch.equal(warp(logits, 1.0), logits)


def test_min_tokens_selects_by_full_length_before_truncation(tiny_model):
    docs = [list(range(1, 101)), list(range(1, 31))]
    res = evaluate_stream(HFCausalLM(tiny_model), docs, StreamEvalConfig(chunk_size=16, max_tokens=20, min_tokens=50))
    assert res.documents == 1 and res.tokens == 19
