"""The CLI: every command has --help; bad input is one error line and a non-zero exit; a tiny end-to-end run."""

import json
import subprocess
import sys

import pytest

from msrnn.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "msrnn.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("cmd", [[], ["demo"], ["tokenizer"], ["pretrain"], ["eval", "ppl"], ["eval", "task"],
                                 ["generate"], ["train", "rmt"], ["train", "supra"], ["train", "bst"]])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: msrnn" in capsys.readouterr().out


def assert_clean_error(proc, fragment):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and fragment in lines[-1], proc.stderr


def test_missing_model_path_is_one_clean_error(tmp_path):
    proc = run_cli("eval", "ppl", "--model", str(tmp_path / "nope"))
    assert_clean_error(proc, "does not exist")


def test_chunk_size_zero_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "ppl", "--model", "x", "--chunk-size", "0"])
    assert e.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_unknown_preset_lists_choices(tmp_path, capsys, tiny_corpus):
    rc = main(["pretrain", "--preset", "huge", "--data", str(tiny_corpus), "--out", str(tmp_path / "m")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err and "small" in err and "tiny" in err
    assert not (tmp_path / "m").exists()


def test_bad_data_specs(capsys, tmp_path):
    assert main(["tokenizer", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["tokenizer", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "t")]) == 2
    assert "no documents" in capsys.readouterr().err
    assert main(["tokenizer", "--data", "stdlib:nosuchsplit", "--out", str(tmp_path / "t")]) == 2
    assert "unknown split" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_encoder_only_model_is_rejected(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    assert main(["eval", "ppl", "--model", str(tmp_path / "bert")]) == 2
    assert "not a causal LM" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("run") / "model"
    rc = main(["pretrain", "--preset", "tiny", "--data", str(tiny_corpus), "--vocab-size", "320",
               "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0",
               "--save-every", "2", "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    return out


def test_pretrain_writes_a_self_contained_model_dir(trained_dir):
    names = {p.name for p in trained_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "msrnn.json", "history.json"} <= names
    meta = json.loads((trained_dir / "msrnn.json").read_text())
    assert meta["family"] == "hf" and meta["preset"] == "tiny" and meta["total_steps"] == 3
    # documents packed in a window, each from position 0: a Llama passes the check and trains on them packed
    assert meta["packing"] == {"packing": "documents", "layout": "packed", "check": "position_ids_restart_documents",
                               "failed": None}
    assert not [n for n in names if n.startswith(".")]  # no temp leftovers


def test_pretrain_refuses_to_clobber_without_resume(trained_dir, capsys, tiny_corpus):
    rc = main(["pretrain", "--preset", "tiny", "--data", str(tiny_corpus), "--out", str(trained_dir)])
    assert rc == 2 and "--resume" in capsys.readouterr().err


def test_eval_ppl_json_schema(trained_dir, tiny_corpus, capsys, tmp_path):
    png = tmp_path / "p.png"
    rc = main(["eval", "ppl", "--model", str(trained_dir), "--data", f"{tiny_corpus}:all", "--chunk-size", "16",
               "--max-tokens", "100", "--max-docs", "3", "--plot", str(png), "--at", "16,100", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ppl", "tokens", "peak_state_bytes", "tokens_per_s", "buckets"):
        assert key in out
    assert out["tokens"] == 3 * 99 and out["ppl"] > 1
    assert abs(out["ppl_at"]["100"] - out["ppl"]) < 1e-6 * out["ppl"]  # the first 100 tokens are all of them
    first16 = [b for b in out["buckets"] if b["end"] <= 16]
    import math

    nll = sum(math.log(b["ppl"]) * b["tokens"] for b in first16) / sum(b["tokens"] for b in first16)
    assert first16 and abs(out["ppl_at"]["16"] - math.exp(nll)) < 1e-4 * out["ppl_at"]["16"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_eval_ppl_uses_a_named_file_whole(trained_dir, tiny_corpus, capsys):
    """A single file has no test split to hash into: naming it evaluates all of it; naming a split still splits."""
    notes = tiny_corpus / "textwrap.py"
    rc = main(["eval", "ppl", "--model", str(trained_dir), "--data", str(notes), "--max-tokens", "64", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 63
    from msrnn.data.corpus import split_of

    other = "test" if split_of("textwrap.py") != "test" else "val"
    rc = main(["eval", "ppl", "--model", str(trained_dir), "--data", f"{notes}:{other}", "--max-tokens", "64"])
    assert rc == 2 and "no documents" in capsys.readouterr().err


def test_eval_harness_passes_every_flag_on(tmp_path, monkeypatch, capsys):
    """Every KV flag reaches the harness model, and --include-path / --num-fewshot / --limit reach lm-eval, with
    lm-eval and the model stubbed (tests/test_harness.py runs the real lm-eval where it is installed)."""
    import sys
    import types

    seen: dict = {}
    harness = types.ModuleType("msrnn.harness")
    harness.MsrnnHarnessLM = lambda model, **kw: seen.setdefault("model", (model, kw))
    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = lambda **kw: seen.setdefault("eval", kw) and {"results": {"t": {"acc": 0.5}}}
    tasks = types.ModuleType("lm_eval.tasks")

    class Manager(tuple):  # lm-eval's TaskManager: knows the names it is asked about
        def match_tasks(self, names):
            return list(names)

    tasks.TaskManager = lambda include_path=None: Manager(("tm", include_path))
    for name, mod in (("msrnn.harness", harness), ("lm_eval", lm_eval), ("lm_eval.tasks", tasks)):
        monkeypatch.setitem(sys.modules, name, mod)
    (tmp_path / "yaml").mkdir()
    out = tmp_path / "res" / "r.json"
    rc = main(["eval", "harness", "--model", "m", "--tasks", "t,u", "--policy", "tova", "--budget", "8", "--sinks", "2",
               "--prefill", "oneshot", "--storage", "fixed", "--include-path", str(tmp_path / "yaml"),
               "--num-fewshot", "3", "--limit", "4", "--output-path", str(out), "--batch-size", "6", "--compile"])
    assert rc == 0, capsys.readouterr().err
    model, kw = seen["model"]
    assert model == "m" and kw["policy"] == "tova" and kw["budget"] == 8 and kw["sinks"] == 2
    assert kw["prefill"] == "oneshot" and kw["storage"] == "fixed" and kw["positions"] == "original"
    assert kw["batch_size"] == 6 and kw["compile"] is True
    ev = seen["eval"]
    assert ev["tasks"] == ["t", "u"] and ev["num_fewshot"] == 3 and ev["limit"] == 4
    assert ev["task_manager"] == ("tm", str(tmp_path / "yaml"))
    assert json.loads(out.read_text())["results"] == {"t": {"acc": 0.5}}
    assert json.loads(out.read_text())["batch_size"] == 6
    assert main(["eval", "harness", "--model", "m", "--tasks", "t", "--sinks", "2"]) == 2  # needs --policy
    assert main(["eval", "harness", "--model", "m", "--tasks", "t", "--include-path", str(out)]) == 2
    assert "need --policy" in capsys.readouterr().err


def test_generate_json(trained_dir, capsys):
    rc = main(["generate", "--model", str(trained_dir), "--prompt", "def f(x):", "--max-new-tokens", "5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 5 and isinstance(out["completion"], str)


def test_corrupt_weights_are_one_clean_error(trained_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = run_cli("eval", "ppl", "--model", str(bad))
    assert_clean_error(proc, "corrupt")
    (bad / "model.safetensors").unlink()
    proc = run_cli("generate", "--model", str(bad), "--prompt", "x")
    assert_clean_error(proc, "no weights")


def test_eval_ppl_with_kv_policy_bounds_state(trained_dir, tiny_corpus, capsys):
    base = ["eval", "ppl", "--model", str(trained_dir), "--data", f"{tiny_corpus}:all", "--max-tokens", "120",
            "--max-docs", "2", "--chunk-size", "32", "--json"]
    assert main(base) == 0
    full = json.loads(capsys.readouterr().out)
    assert main([*base, "--policy", "tova", "--budget", "16"]) == 0
    tova = json.loads(capsys.readouterr().out)
    assert tova["policy"] == "tova@16" and full["policy"] == "full"
    assert tova["tokens"] == full["tokens"]
    assert tova["peak_state_bytes"] < full["peak_state_bytes"] / 4


@pytest.mark.parametrize("flags,msg", [
    (["--budget", "8"], "need --policy"),
    (["--storage", "fixed"], "need --policy"),
    (["--policy", "sink", "--budget", "4", "--sinks", "4"], "sinks (4) must be < budget (4)"),
    (["--policy", "tova"], "needs a budget"),
    (["--policy", "lru", "--budget", "8"], "unknown KV policy 'lru'"),
])
def test_kv_flag_errors(trained_dir, capsys, flags, msg):
    assert main(["eval", "ppl", "--model", str(trained_dir), *flags]) == 2
    assert msg in capsys.readouterr().err


def test_generate_with_policy(trained_dir, capsys):
    rc = main(["generate", "--model", str(trained_dir), "--prompt", "def f(x):\n    return", "--policy", "h2o",
               "--budget", "4", "--max-new-tokens", "6", "--temperature", "0.8", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 6


def test_min_tokens_selects_long_documents_even_when_truncating(trained_dir, tiny_corpus, capsys):
    rc = main(["eval", "ppl", "--model", str(trained_dir), "--data", f"{tiny_corpus}:all", "--min-tokens", "2000",
               "--max-tokens", "64", "--chunk-size", "32", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] >= 1 and out["tokens"] == out["documents"] * 63
