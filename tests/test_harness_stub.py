"""The harness model's own logic without lm-eval installed: lm-eval's two imports are stubbed, so these run
everywhere (tests/test_harness.py compares against lm-eval itself where it is installed)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def harness(monkeypatch, task_model_dir):
    if "lm_eval" not in sys.modules:
        model = types.ModuleType("lm_eval.api.model")
        model.LM = type("LM", (), {"__init__": lambda self: None})
        registry = types.ModuleType("lm_eval.api.registry")
        registry.register_model = lambda *names: (lambda cls: cls)
        for name, mod in {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": types.ModuleType("lm_eval.api"),
                          "lm_eval.models": types.ModuleType("lm_eval.models"),
                          "lm_eval.api.model": model, "lm_eval.api.registry": registry}.items():
            monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.delitem(sys.modules, "msrnn.harness", raising=False)
    from msrnn.harness import MsrnnHarnessLM

    return MsrnnHarnessLM(str(task_model_dir), chunk_size=5, max_gen_toks=6)


def _req(*args):
    return SimpleNamespace(args=args)


def test_generate_until_is_greedy_by_default_and_samples_when_asked(harness, monkeypatch):
    import msrnn.harness as h
    from msrnn.generate import generate

    ids = torch.tensor([harness._encode("Where is Mary?")])
    greedy = harness.tok.decode(generate(harness.lm, ids, 6, eos_token_id=harness.tok.eos_token_id)[0].tolist())
    assert harness.generate_until([_req("Where is Mary?", {"until": []})]) == [greedy]
    seen = []
    monkeypatch.setattr(h, "generate", lambda *a, **kw: seen.append(kw) or generate(*a, **kw))
    sampled = harness.generate_until([_req("Where is Mary?", {"do_sample": True, "temperature": 5.0, "top_k": 50,
                                                              "until": []})])
    assert (seen[-1]["temperature"], seen[-1]["top_k"], seen[-1]["top_p"]) == (5.0, 50, 1.0)
    assert sampled != [greedy]  # at temperature 5 over 384 tokens the six sampled tokens are not the argmax ones
    harness.generate_until([_req("x", {"do_sample": False, "temperature": 0.0})])
    assert seen[-1]["temperature"] == 0.0


def test_generate_until_refuses_options_it_cannot_honour(harness):
    from msrnn.errors import ConfigError

    with pytest.raises(ConfigError, match="num_beams"):
        harness.generate_until([_req("x", {"until": ["\n"], "num_beams": 4})])


def test_loglikelihood_rolling_equals_the_streamed_sum(harness):
    from msrnn.protocol import stream_logits

    text = "def f(x):\n    return x"
    ids = harness._prefix() + harness._encode(text)
    with torch.no_grad():
        lp = torch.log_softmax(stream_logits(harness.lm, torch.tensor([ids]), 5)[0].float(), -1)[:-1]
    want = float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert harness.loglikelihood_rolling([_req(text)]) == [pytest.approx(want)]


@pytest.mark.parametrize("family", ["full", "kv", "kv-oneshot", "supra", "bst", "rmt"])
def test_batched_scoring_equals_one_request_at_a_time(harness, family):
    """Rows of different lengths scored together, right-padded, give each row's own streamed scores in every family
    (a bounded KV cache evicting per row, SUPRA's, BST's and RMT's recurrent states): padding after a row's end is
    never seen by its tokens. Chunks of 5 cut the rows at different offsets; 1- and 2-token rows included."""
    from helpers import V, tiny
    from test_hostile_input import _families

    from msrnn.kv import KVEvictionLM, make_policy

    lms = _families()
    lms["kv-oneshot"] = KVEvictionLM(tiny("llama"), make_policy("h2o", 6), prefill="oneshot")
    harness.lm = lms[family]
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 17, 1, 9, 23, 2, 12)]
    harness.batch_size = 1
    alone = harness._score(rows)
    harness.batch_size = 3
    together = harness._score(rows)
    for (lp1, g1), (lp3, g3), r in zip(alone, together, rows, strict=True):
        assert lp1.shape == lp3.shape == (len(r) - 1,)
        torch.testing.assert_close(lp3, lp1, rtol=0, atol=1e-5)
        assert torch.equal(g1, g3)


def test_batch_size_is_a_number(harness, task_model_dir):
    from msrnn.errors import ConfigError

    cls = type(harness)
    assert cls(str(task_model_dir), batch_size="4").batch_size == 4
    for bad, match in [("auto", "not auto"), ("auto:8", "not auto"), (0, ">= 1"), ("two", ">= 1"), (True, ">= 1")]:
        with pytest.raises(ConfigError, match=match):
            cls(str(task_model_dir), batch_size=bad)


def test_model_arguments_are_honoured_or_refused(harness, task_model_dir):
    """Every KV option in --model_args reaches the cache; an argument the model does not know is refused, not
    dropped (lm-eval's own batch_size and max_batch_size keys are accepted)."""
    from msrnn.errors import ConfigError

    cls = type(harness)
    h = cls(str(task_model_dir), policy="tova", budget="16", sinks="2", keep_newest="true", prefill="chunked:4",
            storage="fixed", batch_size=1, max_batch_size=64)
    layer = h.lm.init_state(1).cache.layers[0]
    assert (layer.policy.budget, layer.policy.sinks, layer.policy.keep_newest) == (16, 2, True)
    assert layer.prefill == "chunked:4" and layer.storage == "fixed"
    with pytest.raises(ConfigError, match="takes no argument poliy"):
        cls(str(task_model_dir), poliy="tova")
    with pytest.raises(ConfigError, match="need policy"):
        cls(str(task_model_dir), sinks=4)
    with pytest.raises(ConfigError, match="true or false"):
        cls(str(task_model_dir), policy="h2o", budget=8, per_head="maybe")
