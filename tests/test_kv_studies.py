"""KV analysis, sweep and benchmark plumbing on tiny models (behaviour, not timings)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import tiny

from msrnn.errors import ConfigError, DataError
from msrnn.kv import KVEvictionLM, make_policy
from msrnn.kv.settings import parse_policy_spec
from msrnn.studies.kv_analysis import token_kind, trace_retention
from msrnn.studies.kv_sweep import SweepConfig, parse_fractions, run_sweep, task_documents


def test_token_kinds():
    assert token_kind("\n    ") == "newline"
    assert token_kind("    ") == "indent"
    assert token_kind("):") == "punct"
    assert token_kind(" self") == "word" and token_kind("_x1") == "word"
    assert token_kind(" 42") == "number"


def test_window_trace_is_the_last_k_positions():
    lm = KVEvictionLM(tiny("llama"), make_policy("window", 5))
    ids = np.arange(1, 21)
    tr = trace_retention(lm, ids)
    for t in range(20):
        want = np.zeros(20)
        want[max(0, t - 4) : t + 1] = 1
        for layer in range(tr.kept.shape[0]):
            np.testing.assert_array_equal(tr.kept[layer, t], want)
    surv = tr.first_token_survival()
    assert all(row["pos0"] == 0.0 for row in surv)  # the window drops the first token once full
    sink = trace_retention(KVEvictionLM(tiny("llama"), make_policy("sink", 5, sinks=2)), ids)
    assert all(row["pos0"] == 1.0 and row["pos1"] == 1.0 and row["pos2"] == 0.0
               for row in sink.first_token_survival())


def test_kind_enrichment_favours_what_is_kept():
    lm = KVEvictionLM(tiny("llama"), make_policy("sink", 4, sinks=2))
    tr = trace_retention(lm, np.arange(1, 31))
    kinds = ["newline" if i < 2 else "word" for i in range(30)]  # the two sinks are "newlines"
    rows = {r["kind"]: r for r in tr.kind_enrichment(kinds)}
    assert rows["newline"]["ratio"] > 1 > rows["word"]["ratio"]


def test_policy_specs_and_fractions():
    assert parse_policy_spec("h2o:per_head=false,recent=16") == ("h2o", {"per_head": False, "recent": 16})
    assert parse_fractions("1/16,1/2") == [Fraction(1, 16), Fraction(1, 2)]
    with pytest.raises(ConfigError):
        parse_policy_spec("h2o:per_head")
    with pytest.raises(ConfigError):
        parse_fractions("2")
    with pytest.raises(ConfigError):
        parse_policy_spec("lru")
    with pytest.raises(ConfigError):
        SweepConfig(tasks=["qa"])


def test_task_documents():
    docs = [np.arange(100), np.arange(10)]
    plain, first = task_documents(docs, "plain", 64, 5)
    assert [len(d) for d in plain] == [64] and first == 1
    copy, first = task_documents(docs, "copy", 64, 5)
    assert first == 32 and np.array_equal(copy[0][:32], copy[0][32:])
    with pytest.raises(DataError):
        task_documents(docs, "plain", 1000, 5)


def test_sweep_rows_and_full_reference(tiny_model):
    from msrnn.models import HFCausalLM

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 384, (80,), generator=g).numpy() for _ in range(3)]
    cfg = SweepConfig(context=64, fractions=[Fraction(1, 4), Fraction(1, 1)], policies=["window", "tova"],
                      tasks=["plain", "copy"], chunk_size=16, max_documents=2)
    res = run_sweep(HFCausalLM(tiny_model), docs, cfg)
    rows = {(r["task"], r["policy"], r["budget"]): r for r in res["rows"]}
    assert len(rows) == 2 * (1 + 2 * 2)
    for task in ("plain", "copy"):
        full = rows[(task, "full", 64)]["ppl"]
        # A budget equal to the context never evicts: identical to the full cache.
        assert rows[(task, "window", 64)]["ppl"] == pytest.approx(full, rel=1e-5)
        assert rows[(task, "tova", 64)]["ppl"] == pytest.approx(full, rel=1e-5)
        assert rows[(task, "window", 16)]["peak_state_bytes"] < rows[(task, "full", 64)]["peak_state_bytes"]


def test_kv_bench_shapes_and_bytes():
    from msrnn.bench.kv import KVBenchConfig, run_kv_bench

    res = run_kv_bench(tiny("llama"), KVBenchConfig(contexts=[16, 48], budget=8, steps=2, rounds=1))
    r16, r48 = res["rows"]
    assert r48["full bytes"] > r16["full bytes"]
    assert r48["tova@8 bytes"] == r16["tova@8 bytes"] < r16["full bytes"]
    assert r16["full tok/s"] > 0 and r48["tova/full speed"] > 0
    # The plain cache holds the budget's tokens at every context (+ warm-up and steps of one round, not more).
    per_token = r48["full bytes"] / (48 + 2 + 2)
    assert r16["plain@8 bytes"] == r48["plain@8 bytes"] == per_token * (8 + 2 + 2)
    for r in (r16, r48):
        assert r["ceiling"] == pytest.approx(r["plain@8 tok/s"] / r["full tok/s"])
        assert r["tova/full of ceiling"] == pytest.approx(r["tova/full speed"] / r["ceiling"])
        # The physical limit: copy bandwidth over the bytes a step reads (all weights + the held KV).
        assert r["full limit tok/s"] == pytest.approx(res["copy bandwidth GB/s"] * 1e9
                                                      / (res["weight bytes"] + r["full bytes"]), rel=1e-2)
        # Bounded caches decode in place by default; TOVA on the naive twin is timed beside it.
        assert r["tova fixed/naive"] == pytest.approx(r["tova@8 tok/s"] / r["tova@8 naive tok/s"])
    assert res["storage"] == "fixed"
    assert r48["tova@8 bytes"] > r48["tova@8 naive bytes"]  # the buffer's free slot is counted
    model = tiny("llama")
    assert res["weight bytes"] == sum(p.numel() * 4 for p in model.parameters())
    naive = run_kv_bench(model, KVBenchConfig(contexts=[16], budget=8, steps=1, rounds=1, storage="naive"))
    assert "tova@8 naive tok/s" not in naive["rows"][0]
    with pytest.raises(ConfigError):
        KVBenchConfig(contexts=[])


def test_real_model_shapes_are_selectable_by_name(task_model_dir, capsys):
    import json

    from transformers import AutoConfig

    from msrnn.cli.main import main
    from msrnn.models.presets import preset_config

    qwen = preset_config("qwen2.5-0.5b", 151936)
    assert (qwen.num_hidden_layers, qwen.hidden_size, qwen.num_attention_heads, qwen.num_key_value_heads,
            qwen.intermediate_size) == (24, 896, 14, 2, 4864)
    llama = preset_config("llama-3.2-1b", 128256)
    assert (llama.num_hidden_layers, llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads,
            llama.intermediate_size, llama.head_dim) == (16, 2048, 32, 8, 8192, 64)
    assert isinstance(AutoConfig.for_model("llama"), type(llama))
    assert main(["bench", "kv", "--shape", "tiny", "--vocab", "300", "--contexts", "24", "--budget", "8",
                 "--steps", "2", "--rounds", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "shape tiny (random weights)" and out["rows"][0]["context"] == 24
    assert main(["bench", "kv-prefill", "--shape", "tiny", "--dtype", "bfloat16", "--tokens", "20", "--chunk", "7",
                 "--budget", "6", "--policies", "tova", "--rounds", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["variant"] == "full"
    # --model and --shape exclude each other; --vocab belongs to --shape.
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(["bench", "kv", "--shape", "tiny", "--model", str(task_model_dir)])
    assert e.value.code == 2
    assert main(["bench", "kv", "--model", str(task_model_dir), "--vocab", "300"]) == 2
    assert main(["bench", "kv", "--shape", "huge"]) == 2


def test_kv_prefill_bench_and_cli(task_model_dir, tmp_path, capsys):
    import json

    from msrnn.bench.kv import KVPrefillBenchConfig, run_kv_prefill_bench
    from msrnn.cli.main import main

    res = run_kv_prefill_bench(tiny("llama"), KVPrefillBenchConfig(tokens=40, chunk=9, budget=8, policies=["tova"],
                                                                   rounds=2, ref=True))
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"full", "tova@8 exact", "tova@8 chunked:64", "tova@8 oneshot", "tova@8 exact (reference twin)"}
    assert rows["full"]["vs full"] == 1.0 and rows["tova@8 exact (reference twin)"]["rounds"] == 1
    assert all(r["tok/s"] > 0 for r in rows.values())
    with pytest.raises(ConfigError, match="below the prompt length"):
        KVPrefillBenchConfig(tokens=8, budget=8)
    assert main(["bench", "kv-prefill", "--model", str(task_model_dir), "--tokens", "30", "--chunk", "7",
                 "--budget", "6", "--policies", "window,h2o", "--modes", "exact,oneshot", "--rounds", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in out["rows"]] == ["full", "window@6 exact", "window@6 oneshot", "h2o@6 exact",
                                                   "h2o@6 oneshot"]
    assert main(["bench", "kv-prefill", "--model", str(task_model_dir), "--policies", "nope"]) == 2
    with pytest.raises(ConfigError, match="unknown prefill mode"):
        KVPrefillBenchConfig(modes=["lazy"])


def test_kv_throughput_bench_sizes_batches_from_bytes(task_model_dir, capsys):
    import json

    from msrnn.bench.kv import KVThroughputBenchConfig, run_kv_throughput_bench
    from msrnn.cli.main import main
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import HFCausalLM
    from msrnn.protocol import prefill

    model = tiny("llama")
    cfg = KVThroughputBenchConfig(context=48, budget=8, steps=3, rounds=2, full_batch=2, max_batch=64)
    res = run_kv_throughput_bench(model, cfg)
    full, bnd = res["rows"]
    # The full cache's per-sequence peak is exactly its KV at context + warm-up + steps tokens, measured here on
    # a real state of that length; the budget holds two of them, so its batch is 2.
    ids = torch.randint(0, model.config.vocab_size, (1, 48 + 2 + 3))
    with torch.inference_mode():
        want_full = HFCausalLM(model).state_nbytes(prefill(HFCausalLM(model), ids, 16)[1])
        bounded = apply_kv(HFCausalLM(model), KVSettings("tova", 8, prefill="oneshot"))
        want_slot = bounded.state_nbytes(prefill(bounded, ids, 1)[1]) / 8
        fixed = apply_kv(HFCausalLM(model), KVSettings("tova", 8, prefill="oneshot", storage="fixed"))
        want_decode = fixed.state_nbytes(prefill(fixed, ids[:, :10], 1)[1])  # in place: 8 + 1 slots + free index
    assert full["peak KV bytes per sequence"] == want_full and full["batch"] == 2
    assert res["memory bytes"] == 2 * want_full
    # The bounded cache holds budget + chunk (8 + 1) slots at its peak, so ~48/9 times more sequences fit; in place
    # it also holds the free slot's index, measured, not assumed.
    assert want_decode > int(want_slot * 9)
    assert bnd["peak KV bytes per sequence"] == want_decode
    assert bnd["KV bytes at the last step"] == bnd["batch"] * want_decode
    assert full["KV bytes at the last step"] == full["peak KV bytes"] == 2 * want_full
    assert bnd["batch"] == res["memory bytes"] // bnd["peak KV bytes per sequence"] > 4 * full["batch"]
    assert bnd["peak KV bytes"] <= res["memory bytes"] and full["peak KV bytes"] <= res["memory bytes"]
    assert res["throughput ratio"] == pytest.approx(bnd["tok/s"] / full["tok/s"])
    assert bnd["tok/s"] == pytest.approx(bnd["batch"] * bnd["tok/s per sequence"])
    # A cap bounds the run time and says so.
    capped = run_kv_throughput_bench(model, KVThroughputBenchConfig(context=48, budget=8, steps=1, rounds=1,
                                                                    full_batch=2, max_batch=3))["rows"][1]
    assert capped["batch"] == 3 and capped["capped"]
    with pytest.raises(ConfigError, match="more than the"):
        run_kv_throughput_bench(model, KVThroughputBenchConfig(context=48, budget=8, memory_bytes=100))
    with pytest.raises(ConfigError, match="below the context"):
        KVThroughputBenchConfig(context=8, budget=8)
    assert main(["bench", "kv", "--model", str(task_model_dir), "--throughput", "--contexts", "40", "--budget", "8",
                 "--steps", "2", "--rounds", "1", "--full-batch", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in out["rows"]] == ["full", "tova@8"] and out["rows"][0]["batch"] == 1
    # Throughput flags without --throughput, two contexts, or both sizings are refused, not ignored.
    assert main(["bench", "kv", "--model", str(task_model_dir), "--memory-mib", "1"]) == 2
    assert main(["bench", "kv", "--model", str(task_model_dir), "--throughput", "--contexts", "40,80"]) == 2
    assert main(["bench", "kv", "--model", str(task_model_dir), "--throughput", "--contexts", "40",
                 "--memory-mib", "1", "--full-batch", "2"]) == 2
    assert "only applies with --throughput" in capsys.readouterr().err


def test_saved_results_carry_their_provenance(tmp_path):
    """Every results.json a command writes names the command line, the versions and the machine's load, so a figure
    quoted from it in the docs comes with how it was measured (scripts/docs_results.py prints it)."""
    import json

    import torch
    import transformers

    from msrnn.cli.main import main

    argv = ["bench", "kv-prefill", "--shape", "tiny", "--tokens", "20", "--chunk", "7", "--budget", "8",
            "--policies", "tova", "--modes", "exact", "--rounds", "1", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    p = json.loads((tmp_path / "results.json").read_text())["provenance"]
    assert p["command"] == "msrnn " + " ".join(argv)
    assert p["torch"] == torch.__version__ and p["transformers"] == transformers.__version__
    assert p["threads"] == torch.get_num_threads() and p["date"].endswith("UTC")
    assert len(p["load_at_start"]) == 3 and len(p["load_at_end"]) == 3
