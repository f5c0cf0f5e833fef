"""msrnn.build: each family sized to a byte budget (measured, and as large as fits), built from the base
weights with equal training tokens, cached; compare --build puts them next to KV eviction."""

import json
from pathlib import Path

import pytest
from helpers import tiny

from msrnn.build import BuildConfig, fit, make_model, size_for_state_bytes
from msrnn.cli.main import main
from msrnn.errors import ConfigError
from msrnn.families import FAMILIES
from msrnn.protocol import measure_state_bytes

BUDGETS = [8192, 20000]
KNOB = {"supra": ("feature_dim", 2), "bst": ("block_size", 8), "rmt": ("segment_length", 1)}


@pytest.mark.parametrize("family", ["supra", "bst", "rmt"])
def test_sizing_is_the_largest_that_fits_measured(family):
    base = tiny("llama", seed=1)
    cfg = BuildConfig(seq_len=64)
    spec = FAMILIES.get(family)
    for budget in BUDGETS:
        knobs, nbytes = fit(family, base, budget, cfg.options(family))
        assert knobs is not None
        span = spec.probe(knobs)[0]

        def measured(kn, span=span):
            lm = spec.as_lm(make_model(family, base, kn, cfg).eval())
            return measure_state_bytes(lm, tokens=2 * span)

        assert measured(knobs) == nbytes <= budget  # a longer probe finds no larger peak
        knob, step = KNOB[family]
        assert measured(knobs.replace(**{knob: getattr(knobs, knob) + step})) > budget  # one step larger won't fit


def test_sizes_that_cannot_fit_and_bad_configs():
    base = tiny("llama", seed=1)
    assert size_for_state_bytes("rmt", base.config, 600) is None  # not even 2 memory tokens and an 8-token segment
    assert size_for_state_bytes("bst", base.config, 600) is None
    with pytest.raises(ConfigError, match="cannot build lstm"):
        BuildConfig(families=("lstm",))
    with pytest.raises(ConfigError, match="less than one batch"):
        BuildConfig(train_tokens=10)
    with pytest.raises(ConfigError, match="bounded variant"):
        BuildConfig(knobs={"bst": {"variant": "full"}})


def _compare_argv(tmp_path, corpus, tokenizer, *settings: str) -> list[str]:
    """``msrnn compare`` on a saved tiny base with tiny documents and builds, plus ``settings``; JSON to stdout."""
    tiny("llama", seed=1).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(str(tmp_path / "base"))
    return ["compare", "--base", str(tmp_path / "base"), "--build", "supra,bst,rmt", "--build-seq-len", "64",
            "--build-data", str(corpus), "--data", str(corpus), "--documents", "file", "--max-tokens", "64",
            "--chunk-size", "16", "--profile-tokens", "32", "--probe-tokens", "64", *settings,
            "--out", str(tmp_path / "rep"), "--json", "--quiet"]


def test_compare_build_equal_tokens_cached_and_reported(tmp_path, tiny_corpus, task_tokenizer, capsys):
    argv = _compare_argv(tmp_path, tiny_corpus, task_tokenizer, "--state-bytes", "8192,600", "--policies", "window",
                         "--build-tokens", "512", "--max-docs", "2")
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    names = {e["name"]: e for e in report["entries"]}
    tokens = set()
    for fam in ("supra", "bst", "rmt"):
        e = names[f"{fam}@8192"]
        assert e["family"] == fam and e["sizing"] and e["state_bytes"] <= 8192 and e["nonfinite"] == 0
        meta = json.loads((Path(e["model"]) / "msrnn.json").read_text())
        assert meta["budget_bytes"] == 8192 and meta["sizing"] == e["sizing"]
        tokens.add(meta["train_tokens"])
        assert f"{fam}@600" not in names
    # every family trained on the same number of tokens, up to rounding to whole steps of 4 sequences
    assert min(tokens) >= 512 and max(tokens) - min(tokens) < 4 * 64
    assert any("rmt cannot fit 600" in n for n in report["notes"])
    md = (Path(report["folder"]) / "report.md").read_text()
    assert "## Perplexity at equal state bytes" in md and "supra (built)" in md
    stamps = {fam: (Path(names[f"{fam}@8192"]["model"]) / "msrnn.json").stat().st_mtime_ns
              for fam in ("supra", "bst", "rmt")}
    assert main(argv[:-4] + ["--out", str(tmp_path / "rep2"), "--json", "--quiet"]) == 0  # a new report folder
    again = {e["name"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    for fam, stamp in stamps.items():  # ... reuses the built models instead of training them again
        assert again[f"{fam}@8192"]["model"] == names[f"{fam}@8192"]["model"]
        assert (Path(again[f"{fam}@8192"]["model"]) / "msrnn.json").stat().st_mtime_ns == stamp
    assert main(argv[:3] + ["--build", "supra", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--state-bytes" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["mh", "mf", "slide"])
def test_bst_variants_are_sized_as_large_as_fits(variant):
    base = tiny("llama", seed=1)
    cfg = BuildConfig(seq_len=64, knobs={"bst": {"variant": variant}})
    knobs, nbytes = fit("bst", base, 20000, cfg.options("bst"))
    W = knobs.block_size
    bigger = make_model("bst", base, knobs.replace(block_size=W + 8), cfg).eval()
    assert nbytes <= 20000 < measure_state_bytes(FAMILIES.get("bst").as_lm(bigger), tokens=3 * W + 64)


def test_task_tune_schedule_is_by_steps_and_equal_for_everyone():
    from msrnn.train.tasks import TaskTuneConfig

    cfg = TaskTuneConfig(max_segments=4, steps=10, batch_size=3, segment_length=50)
    stages = [cfg.segments_at(s) for s in range(10)]
    assert stages == [1, 1, 1, 2, 2, 3, 3, 3, 4, 4]  # an equal share of the run per length, in order
    assert cfg.tokens == sum(stages) * 50 * 3
    with pytest.raises(ConfigError, match="unknown task"):
        TaskTuneConfig(task="sorting")


def test_compare_task_steps_tunes_every_family_on_the_same_samples(tmp_path, tiny_corpus, task_tokenizer, capsys):
    argv = _compare_argv(tmp_path, tiny_corpus, task_tokenizer, "--state-bytes", "8192", "--policies", "window,tova",
                         "--build-tokens", "256", "--max-docs", "1", "--task", "memorize", "--segments", "1,2",
                         "--segment-length", "96", "--samples", "4", "--task-steps", "2")
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    names = {e["name"]: e for e in report["entries"]}
    tuned = {n: e for n, e in names.items() if n.endswith("+memorize")}
    assert set(tuned) == {"kv:window@8192+memorize", "kv:tova@8192+memorize", "supra@8192+memorize",
                          "bst@8192+memorize", "rmt@8192+memorize"}
    assert all(e["task_trained"] for e in tuned.values())
    assert not any(names[n.split("+")[0]]["task_trained"] for n in tuned)
    assert tuned["kv:window@8192+memorize"]["model"] == tuned["kv:tova@8192+memorize"]["model"]  # one tuned base
    metas = [json.loads((Path(e["model"]) / "msrnn.json").read_text()) for e in tuned.values()]
    assert len({m["task_tune"]["tokens"] for m in metas}) == 1 and all(m["task"] == "memorize" for m in metas)
    for fam in ("supra", "bst", "rmt"):  # a tuned copy has the state of the model it was tuned from
        assert tuned[f"{fam}@8192+memorize"]["state_bytes"] == names[f"{fam}@8192"]["state_bytes"]
        assert tuned[f"{fam}@8192+memorize"]["family"] == fam
    md = (Path(report["folder"]) / "report.md").read_text()
    assert "accuracy at equal state bytes, after 2 fine-tuning steps" in md
    i = argv.index("--task")
    assert main(argv[:i] + argv[i + 2 : -4] + ["--out", str(tmp_path), "--quiet"]) == 2  # --task-steps without --task
    assert "give --task" in capsys.readouterr().err
