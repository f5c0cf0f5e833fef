"""`msrnn demo` end to end at toy size: it trains, caches, evaluates, writes both plots and reuses the cache."""

import json

import pytest

from msrnn.cli.main import main


@pytest.mark.slow
def test_demo_runs_and_reuses_its_cache(tmp_path, capsys):
    args = ["demo", "--preset", "tiny", "--max-steps", "2", "--eval-tokens", "256", "--kv-budget", "16",
            "--no-families", "--kv-docs", "2", "--out", str(tmp_path / "out"), "--json", "--quiet"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["trained_now"] is True
    for key in ("plot", "kv_plot"):
        assert open(first[key], "rb").read(4) == b"\x89PNG"
    policies = [r["policy"] for r in first["kv"]]
    assert policies[0] == "full" and {"window@16", "tova@16"} <= set(policies)
    full_bytes = first["kv"][0]["peak_state_bytes"]
    assert all(r["peak_state_bytes"] < full_bytes for r in first["kv"][1:])
    assert first["induction"]["windows"] > 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["heldout_ppl"] == first["heldout_ppl"]

    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["trained_now"] is False
    assert second["heldout_ppl"] == pytest.approx(first["heldout_ppl"], rel=1e-6)


def test_demo_families_section_trains_caches_and_compares(tmp_path, tiny_corpus, task_tokenizer):
    from helpers import tiny

    from msrnn.cli.demo_families import families_section

    base = tmp_path / "base"
    tiny("llama", seed=1).save_pretrained(base)
    task_tokenizer.save_pretrained(str(base))
    (base / "msrnn.json").write_text(json.dumps({"family": "hf", "preset": "tiny"}))
    report = families_section(base, 512, tmp_path / "out", progress=False, budget=8192, max_tokens=64,
                              data=str(tiny_corpus), seq_len=64)
    families = {e["family"] for e in report["entries"]}
    assert families == {"full", "kv", "supra", "bst", "rmt"}
    assert all(e["state_bytes"] <= 8192 for e in report["entries"] if e["family"] != "full")
    assert (tmp_path / "out" / "compare" / report["folder"].split("/")[-1] / "report.md").exists()
    rmt = next(e for e in report["entries"] if e["family"] == "rmt")
    assert [r["segments"] for r in rmt["task"]] == [1, 4]
    again = families_section(base, 512, tmp_path / "out", progress=False, budget=8192, max_tokens=64,
                             data=str(tiny_corpus), seq_len=64)
    assert all(e["resumed"] for e in again["entries"])  # models cached, entries resumed
