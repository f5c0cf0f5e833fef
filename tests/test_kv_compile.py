"""torch.compile of the fixed-storage decode step: one graph for every in-place step, the eager step's results."""

import pytest
import torch
from helpers import V, assert_close, tiny

from msrnn.errors import ConfigError
from msrnn.kv import KVEvictionLM, KVSettings, make_policy


def _run(lm, x, sizes):
    state, logits, kept, pos = lm.init_state(x.shape[0]), [], [], 0
    with torch.no_grad():
        for n in sizes:
            out, state = lm.forward_chunk(x[:, pos : pos + n], state)
            pos += n
            logits.append(out)
            kept.append([layer.kept_positions().clone() for layer in state.cache.layers])
    return torch.cat(logits, 1), kept, state


@pytest.mark.parametrize("arch,attn,policy", [("llama", "sdpa", "tova"), ("qwen2", "eager", "h2o")])
def test_compiled_decode_equals_eager_with_one_graph(arch, attn, policy):
    """A batch of 2 (rows evict different slots), GQA: prefill, 20 in-place steps, a multi-token chunk (back to the
    chronological layout), 20 more steps. The compiled steps keep the same tokens and give the eager logits, and
    Dynamo builds one graph for all of them: no recompiles as positions and token counters move on."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny(arch, attn, seed=3)
    x = torch.randint(0, V, (2, 60), generator=torch.Generator().manual_seed(4))
    sizes = [11] + [1] * 20 + [9] + [1] * 20
    eager = _run(KVEvictionLM(model, make_policy(policy, 8), storage="fixed"), x, sizes)
    compiled_lm = KVEvictionLM(model, make_policy(policy, 8), storage="fixed", compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _run(compiled_lm, x, sizes)
    assert compiled_lm._compiled is not None
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert_close(f"{arch}/{policy}", eager[0], compiled[0], atol=1e-5)
    for step, (a, b) in enumerate(zip(eager[1], compiled[1], strict=True)):
        for la, lb in zip(a, b, strict=True):
            assert torch.equal(la, lb), f"step {step}: kept {lb.tolist()} != eager {la.tolist()}"
    assert compiled[2].seen == eager[2].seen == 60
    assert all(int(layer.counter[0]) == 60 for layer in compiled[2].cache.layers)


def test_compiled_step_still_refuses_a_padding_token():
    """The padding check of an in-place step has no host sync when compiled; it still raises when the step runs."""
    from msrnn.compat import cache_kwargs

    torch._dynamo.reset()
    model = tiny("llama", "sdpa", seed=5)
    lm = KVEvictionLM(model, make_policy("tova", 8), storage="fixed", compile=True)
    state = lm.init_state(2)
    with torch.no_grad():
        for n in (10, 1, 1):
            _, state = lm.forward_chunk(torch.zeros(2, n, dtype=torch.long), state)
        mask = torch.ones(2, state.seen + 1, dtype=torch.long)
        mask[1, -1] = 0  # the new token of row 1 is padding: right padding, which in-place decoding refuses
        with pytest.raises(RuntimeError, match="padding token arrived"):
            lm._forward_fn(state, 1)(input_ids=torch.zeros(2, 1, dtype=torch.long), attention_mask=mask,
                                     position_ids=torch.full((2, 1), state.seen), use_cache=True,
                                     **cache_kwargs(state.cache, model))


def test_compile_is_refused_where_there_is_no_fixed_step():
    model = tiny("llama")
    with pytest.raises(ConfigError, match="fixed storage"):
        KVEvictionLM(model, make_policy("tova", 8), compile=True)
    with pytest.raises(ConfigError, match="budget"):
        KVEvictionLM(model, make_policy("full", None), storage="fixed", compile=True)
    with pytest.raises(ConfigError, match="fixed storage"):
        KVSettings("tova", 8, compile=True)
    with pytest.raises(ConfigError, match="true or false"):
        KVSettings("tova", 8, storage="fixed", compile="yes")
    lm = KVEvictionLM(model, make_policy("tova", 8), storage="fixed")  # off by default: the model runs eagerly
    state = lm.init_state(1)
    with torch.no_grad():
        for n in (10, 1, 1):
            _, state = lm.forward_chunk(torch.zeros(1, n, dtype=torch.long), state)
    assert lm._compiled is None


def test_compile_flag_reaches_the_model():
    import argparse

    from msrnn.cli.eval_cmds import add_model_flags, kv_settings
    from msrnn.kv import apply_kv
    from msrnn.models import HFCausalLM

    p = argparse.ArgumentParser()
    add_model_flags(p)
    args = p.parse_args(["--model", "m", "--policy", "tova", "--budget", "8", "--storage", "fixed", "--compile"])
    s = kv_settings(args)
    assert s == KVSettings("tova", 8, storage="fixed", compile=True)
    assert apply_kv(HFCausalLM(tiny("llama")), s).compile
    args = p.parse_args(["--model", "m", "--compile"])
    with pytest.raises(ConfigError, match="need --policy"):
        kv_settings(args)


def test_commands_that_feed_no_single_token_step_refuse_compile(task_model_dir, capsys):
    """eval ppl in chunks and eval task stream multi-token chunks only: --compile there would compile nothing, so it
    is refused up front (eval ppl token by token takes it)."""
    from msrnn.cli.main import main

    kv = ["--policy", "tova", "--budget", "8", "--storage", "fixed", "--compile"]
    assert main(["eval", "ppl", "--model", str(task_model_dir), "--chunk-size", "16", *kv]) == 2
    assert "use --chunk-size 1" in capsys.readouterr().err
    assert main(["eval", "task", "--model", str(task_model_dir), "--task", "memorize", "--segment-length", "32",
                 "--segments", "1", "--samples", "2", *kv]) == 2
    assert "nothing would be compiled" in capsys.readouterr().err


def test_bench_kv_times_the_compiled_step_beside_the_eager_one(capsys):
    import json

    from msrnn.cli.main import main

    torch._dynamo.reset()
    assert main(["bench", "kv", "--shape", "tiny", "--vocab", "300", "--contexts", "24", "--budget", "8",
                 "--steps", "2", "--rounds", "1", "--compile", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    row = out["rows"][0]
    assert out["compile"] and row["tova@8 compiled bytes"] == row["tova@8 bytes"]
    assert row["tova compiled/eager"] == pytest.approx(row["tova@8 compiled tok/s"] / row["tova@8 tok/s"])
    assert row["tova compiled/plain"] == pytest.approx(row["tova@8 compiled tok/s"] / row["plain@8 tok/s"])
    for bad in (["--storage", "naive"], ["--throughput"]):
        assert main(["bench", "kv", "--shape", "tiny", "--contexts", "24", "--compile", *bad]) == 2
    assert "--compile" in capsys.readouterr().err


def test_compile_falls_back_loudly_and_models_do_not_share_a_limit():
    """Dynamo keeps 8 graphs per code object (shared by every model of a class) and then ran eagerly without a word,
    so 'compiled' figures could be eager ones. Each KV model now compiles in an isolated region, and a limit that is
    still hit is reported (the step then runs eagerly, with the right result)."""
    from torch._dynamo.utils import counters

    from msrnn.kv.lm import _compiled_step

    torch._dynamo.reset()
    counters.clear()
    x = torch.randint(0, V, (1, 14))
    with torch._dynamo.config.patch(recompile_limit=1):
        for seed in range(2):  # two models of one class, one graph each: no fallback at a limit of 1
            lm = KVEvictionLM(tiny("llama", seed=seed), make_policy("tova", 8), storage="fixed", compile=True)
            _run(lm, x, [10, 1, 1, 1, 1])
            assert not lm.compile_fell_back
        assert counters["stats"]["unique_graphs"] == 2
        said = []
        step = _compiled_step(lambda t: t * 2, said.append)
        assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
        assert torch.equal(step(torch.ones(2, 2)), torch.full((2, 2), 2.0))  # a new rank: past the limit of 1
    assert len(said) == 1 and "RecompileLimit" in said[0]
