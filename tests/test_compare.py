"""msrnn compare: every family on the same documents, KV matched to each bounded model's bytes, resumable."""

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny

from msrnn.cli.main import main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, task_tokenizer):
    from msrnn.bst import BSTConfig, BSTForCausalLM
    from msrnn.rmt import MemoryWrapper

    root = tmp_path_factory.mktemp("cmp")
    base = tiny("llama", seed=1)
    base.save_pretrained(root / "base")
    torch.manual_seed(0)
    bst = BSTForCausalLM(BSTConfig(vocab_size=base.config.vocab_size, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=96, block_size=16, state_size=8))
    bst.save_pretrained(root / "bst")
    rmt = MemoryWrapper.wrap(tiny("llama", seed=1), num_memory_tokens=4, segment_length=96, task="memorize",
                             label_names=["bathroom", "hallway", "garden", "office", "bedroom", "kitchen"])
    rmt.save_pretrained(root / "rmt")
    for name in ("base", "bst", "rmt"):
        task_tokenizer.save_pretrained(str(root / name))
    (root / "rmt" / "msrnn.json").write_text(json.dumps({"family": "rmt"}))
    return root


def test_compare_report_schema_and_resume(dirs, tiny_corpus, tmp_path, capsys):
    argv = ["compare", "--base", str(dirs / "base"), "--models", f"{dirs / 'bst'},{dirs / 'rmt'}",
            "--state-bytes", "8192", "--policies", "window,tova", "--data", str(tiny_corpus), "--documents", "file",
            "--max-tokens", "80", "--max-docs", "2", "--chunk-size", "16", "--task", "memorize", "--segments", "1,2",
            "--segment-length", "96", "--samples", "4", "--profile-tokens", "64", "--out", str(tmp_path / "rep"),
            "--json", "--quiet"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    folder = tmp_path / "rep" / Path(report["folder"]).name
    assert folder.name.startswith("compare-base-") and folder.is_dir()
    names = {e["name"]: e for e in report["entries"]}
    assert report["schema"] == 2 and "full" in names and "kv:tova@8192" in names
    bst, rmt = names["bst:bst"], names["rmt:rmt"]
    for e in report["entries"]:
        assert {"name", "family", "state_bytes", "ppl", "tokens_per_s", "ppl_by_position"} <= set(e)
        assert e["ppl"] > 1 and e["nonfinite"] == 0 and not e["resumed"]
    # KV policies run at each bounded model's own byte count, and stay within it.
    for model in (bst, rmt):
        kv = names[f"kv:tova@{model['budget_bytes']}"]
        assert kv["state_bytes"] <= model["budget_bytes"]
    per_slot = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head_dim 16 x fp32
    tova = names["kv:tova@8192"]
    assert 8192 // per_slot - 2 <= tova["slots"] <= 8192 // per_slot and tova["state_bytes"] <= 8192
    assert [r["segments"] for r in rmt["task"]] == [1, 2] and [r["segments"] for r in names["full"]["task"]] == [1, 2]
    assert rmt["task_trained"] and not names["full"]["task_trained"]  # zero-shot entries are marked
    assert names["full"]["task_chance"] == pytest.approx(1 / 6)
    for f in ("report.md", "results.json", "ppl_vs_state.png", "ppl_vs_position.png", "accuracy_vs_length.png",
              "speed_memory_vs_length.png"):
        assert (folder / f).exists(), f
    # The models given with --models have their own columns in the equal-bytes table, next to the KV policies
    # sized to them (they used to appear only in the per-entry table).
    table = (folder / "report.md").read_text().split("## Perplexity at equal state bytes")[1].split("##")[0]
    header = table.strip().splitlines()[0]
    assert "bst:bst" in header and "rmt:rmt" in header and "kv tova" in header
    row = next(line for line in table.splitlines() if line.startswith(f"| {bst['budget_bytes']:,} |"))
    assert f"{bst['ppl']:.2f}" in row
    assert [p["tokens"] for p in bst["profile"]] == [16, 32, 48, 64]  # 64 tokens in chunks of 16
    assert len({p["state_bytes"] for p in names["kv:tova@8192"]["profile"][1:]}) == 1  # bounded: flat
    full = [p["state_bytes"] for p in names["full"]["profile"]]
    assert full[-1] == 4 * full[0]  # the full cache grows with length
    saved = json.loads((folder / "results.json").read_text())
    assert saved["schema"] == 2 and saved["config"]["state_bytes"] == [8192] and len(saved["entries"]) == len(names)
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["folder"] == report["folder"] and all(e["resumed"] for e in again["entries"])
    assert [e["ppl"] for e in again["entries"]] == [e["ppl"] for e in report["entries"]]
    # Another config never writes into this folder.
    assert main([a if a != "window,tova" else "tova" for a in argv]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["folder"] != report["folder"] and not any(e["resumed"] for e in other["entries"])
    assert len(list((tmp_path / "rep").iterdir())) == 2


def test_compare_rejects_a_model_with_another_tokenizer(dirs, tiny_tokenizer, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(dirs / "bst", other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    tiny_tokenizer.save_pretrained(str(other))
    rc = main(["compare", "--base", str(dirs / "base"), "--models", str(other), "--out", str(tmp_path / "r"),
               "--quiet"])
    assert rc == 2 and "different tokenizer" in capsys.readouterr().err


def test_compare_bad_input(dirs, tmp_path, capsys):
    assert main(["compare", "--base", str(dirs / "base"), "--state-bytes", "-5", "--out", str(tmp_path),
                 "--quiet"]) == 2
    assert "positive" in capsys.readouterr().err
    assert main(["compare", "--base", str(dirs / "base"), "--policies", "lru", "--out", str(tmp_path),
                 "--quiet"]) == 2
    assert "unknown KV policy 'lru'" in capsys.readouterr().err


def test_a_damaged_report_folder_is_named_or_rerun(dirs, tiny_corpus, tmp_path, capsys):
    """A damaged plan.json is one line; a damaged entry, or one whose perplexity is not a number (which used to be
    accepted and then fail inside matplotlib), is evaluated again."""
    argv = ["compare", "--base", str(dirs / "base"), "--state-bytes", "8192", "--policies", "window",
            "--data", str(tiny_corpus), "--documents", "file", "--max-tokens", "48", "--max-docs", "1",
            "--chunk-size", "16", "--profile-tokens", "32", "--out", str(tmp_path / "rep"), "--json", "--quiet"]
    assert main(argv) == 0
    folder = Path(json.loads(capsys.readouterr().out)["folder"])
    entries = sorted((folder / "entries").glob("*.json"))
    entries[0].write_text("{cut short")
    second = json.loads(entries[1].read_text())
    entries[1].write_text(json.dumps({**second, "ppl": float("nan")}))
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert not any(e["resumed"] for e in report["entries"][:0])
    rerun = {e["name"]: e["resumed"] for e in report["entries"]}
    assert sum(not r for r in rerun.values()) == 2  # both damaged entries ran again, the rest resumed
    assert all(e["ppl"] == e["ppl"] for e in report["entries"])  # no NaN
    (folder / "plan.json").write_text("[]")
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("msrnn: error:") and "plan.json is damaged" in err and "\n" not in err
