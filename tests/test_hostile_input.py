"""Hostile input, CLI and API: every kind of bad input is refused with one line and a non-zero exit (or a typed
exception), never a traceback, a silently different run or a half-written file; a crafted checkpoint cannot run
code."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import V, tiny

from msrnn.cli.main import main
from msrnn.errors import ConfigError

TRAIN = ["--preset", "tiny", "--vocab-size", "320", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0",
         "--quiet"]


def one_error(capsys, rc: int, fragment: str) -> str:
    """The command failed with exit 2 and one stderr error line (after any progress bar) that names the problem."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("msrnn: error: ")]
    assert rc == 2, err
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    assert fragment in errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_corpus) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "m"
    assert main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "2", "--save-every", "1",
                 "--out", str(out)]) == 0
    return out


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


# ---------------------------------------------------------------- a crafted checkpoint must not run code
class _RunsCode:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_a_crafted_checkpoint_file_is_refused_and_never_run(model_dir, tmp_path, tiny_corpus, capsys, name):
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    state = next(out.glob(f"checkpoints/step-*/{name}"))
    sentinel = tmp_path / "PWNED"
    torch.save({"step": 1, "payload": _RunsCode(str(sentinel))}, state)
    before = state.read_bytes()
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "4", "--out", str(out), "--resume"])
    one_error(capsys, rc, "refusing to unpickle")
    assert not sentinel.exists()  # the payload did not run
    assert state.read_bytes() == before  # and nothing was overwritten


def test_checkpoint_files_hold_only_safe_types(model_dir):
    """Every file of a checkpoint loads without unpickling code: Accelerate's under weights_only=True (NumPy's RNG
    arrays through its allow-list), msrnn's own state as JSON."""
    import json

    from accelerate.utils import load

    ckpt = next(model_dir.glob("checkpoints/step-*"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                                      "trainer_state.json"]
    assert {"state", "param_groups"} <= set(load(ckpt / "optimizer.bin", weights_only=True))
    assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(load(ckpt / "random_states_0.pkl",
                                                                                 weights_only=True))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert {"step", "history", "config", "scheduler", "processes"} <= set(state)


def test_a_checkpoint_from_before_accelerate_state_saving_is_named(model_dir, tmp_path, tiny_corpus, capsys):
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    ckpt = next(out.glob("checkpoints/step-*"))
    for f in ckpt.iterdir():
        f.unlink()
    torch.save({"step": 1}, ckpt / "trainer_state.pt")
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "4", "--out", str(out), "--resume"])
    one_error(capsys, rc, "written by an older msrnn")


# ---------------------------------------------------------------- file-system errors are one line
def test_plot_that_is_a_folder(model_dir, tiny_corpus, tmp_path, capsys):
    (tmp_path / "plots").mkdir()
    rc = main(["eval", "ppl", "--model", str(model_dir), "--data", f"{tiny_corpus}:all", "--max-docs", "1",
               "--max-tokens", "32", "--plot", str(tmp_path / "plots")])
    one_error(capsys, rc, "is a folder; name a file there")  # refused before the evaluation runs
    assert [p.name for p in tmp_path.iterdir()] == ["plots"]


def test_out_under_a_file(model_dir, tiny_corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    rc = main(["eval", "ppl", "--model", str(model_dir), "--data", f"{tiny_corpus}:all", "--max-docs", "1",
               "--max-tokens", "32", "--plot", str(tmp_path / "afile" / "x.png")])
    one_error(capsys, rc, "which is a file")
    assert (tmp_path / "afile").read_text() == "keep me"
    rc = main(["kv", "sweep", "--model", str(model_dir), "--data", f"{tiny_corpus}:all", "--out",
               str(tmp_path / "afile")])
    one_error(capsys, rc, "is a file; name a folder there")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_unwritable_folder(model_dir, tiny_corpus, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(["eval", "ppl", "--model", str(model_dir), "--data", f"{tiny_corpus}:all", "--max-docs", "1",
                   "--max-tokens", "32", "--plot", str(ro / "x.png")])
        one_error(capsys, rc, "is not writable")
    finally:
        ro.chmod(0o755)


def test_unwritable_parent_is_refused_before_work(monkeypatch, capsys, tmp_path):
    """The same check as above where the suite runs as root (which may write anywhere): os.access says no."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    one_error(capsys, main(["eval", "ppl", "--model", "never-loaded", "--plot", str(tmp_path / "x.png")]),
              "is not writable")


def test_os_errors_of_any_kind_are_one_line(monkeypatch, capsys):
    """The CLI's boundary: any OSError a command meets (disk full, permission, ...) is one error line."""
    from msrnn.cli import eval_cmds

    def full_disk(args):
        raise OSError(28, "No space left on device", "/data/out.json")

    monkeypatch.setattr(eval_cmds, "run_eval_ppl", full_disk)
    rc = main(["eval", "ppl", "--model", "x"])
    one_error(capsys, rc, "/data/out.json: No space left on device")


# ---------------------------------------------------------------- malformed model folders and flags
def test_config_json_that_is_an_array(model_dir, tmp_path, capsys):
    bad = _copy_model(model_dir, tmp_path / "bad")
    (bad / "config.json").write_text("[1, 2]")
    one_error(capsys, main(["generate", "--model", str(bad), "--prompt", "x"]), "holds a JSON list")
    (bad / "config.json").write_text("{not json")
    one_error(capsys, main(["generate", "--model", str(bad), "--prompt", "x"]), "not valid JSON")


def test_weights_of_another_size_name_the_tensor(model_dir, tmp_path, capsys):
    bad = _copy_model(model_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"] *= 2
    (bad / "config.json").write_text(json.dumps(cfg))
    line = one_error(capsys, main(["generate", "--model", str(bad), "--prompt", "x"]), "another model size")
    assert "embed_tokens.weight: saved" in line and "above report" not in line


@pytest.mark.parametrize("flags,fragment", [
    (["--device", "tpu9"], "not a device"),
    (["--temperature", "nan"], "finite temperature"),
    (["--temperature", "inf"], "finite temperature"),
    (["--top-p", "nan"], "top_p"),
])
def test_bad_generation_flags(model_dir, capsys, flags, fragment):
    one_error(capsys, main(["generate", "--model", str(model_dir), "--prompt", "def f", *flags]), fragment)


def test_bad_policy_option_values(model_dir, tiny_corpus, capsys):
    base = ["kv", "sweep", "--model", str(model_dir), "--data", f"{tiny_corpus}:all"]
    one_error(capsys, main([*base, "--policies", "tova:per_head=maybe"]), "use true, false or an integer")
    one_error(capsys, main([*base, "--policies", "tova:per_head=1"]), "per_head is true or false")


def test_a_binary_babilong_file(model_dir, tmp_path, capsys):
    blob = tmp_path / "qa1.txt"
    blob.write_bytes(bytes(range(256)) * 40)
    argv = ["eval", "task", "--model", str(model_dir), "--task", "detect", "--segment-length", "16",
            "--babilong", str(blob)]
    one_error(capsys, main(argv), "not UTF-8 text")
    blob.write_text("5")
    one_error(capsys, main(argv), "not in BABILong format")
    blob.write_text(json.dumps([{"input": ["a list"], "question": "q?", "target": "yes"}]))
    one_error(capsys, main(argv), "sample 0 has non-text input (list)")
    blob.write_text(json.dumps([{"input": "x", "question": "q?", "target": "yes"}]))
    one_error(capsys, main([*argv, "--segments", "1,2"]), "drop --segments")


# ---------------------------------------------------------------- training runs that would silently differ
def test_resume_a_tiny_checkpoint_as_another_preset(model_dir, tmp_path, tiny_corpus, capsys):
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    argv = ["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "4", "--out", str(out), "--resume"]
    argv[argv.index("tiny")] = "small"
    one_error(capsys, main(argv), "trained on other settings (preset 'tiny' -> 'small')")


def test_resume_with_another_learning_rate_is_refused(model_dir, tmp_path, tiny_corpus, capsys):
    """The optimizer's saved lr would win over --lr while msrnn.json recorded the new one."""
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    meta = (out / "msrnn.json").read_text()
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "4", "--out", str(out), "--resume",
               "--lr", "1e-4"])
    one_error(capsys, rc, "lr 0.002 -> 0.0001")
    assert (out / "msrnn.json").read_text() == meta


def test_resume_with_nothing_to_resume(tmp_path, tiny_corpus, capsys):
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "2", "--out", str(tmp_path / "new"),
               "--resume"])
    one_error(capsys, rc, "nothing to resume")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("steps,fragment", [
    ("6", "the run diverged"),  # the loss turns NaN within the run
    ("1", "an update destroyed the weights"),  # one step: the logged loss is healthy, the weights are ~1e8
])
def test_a_diverging_run_stops_and_exports_nothing(tmp_path, tiny_corpus, capsys, steps, fragment):
    out = tmp_path / "nan"
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", steps, "--warmup-steps", "0",
               "--lr", "1e8", "--out", str(out)])
    one_error(capsys, rc, fragment)
    assert not (out / "msrnn.json").exists() and not (out / "model.safetensors").exists()


def test_seq_len_past_the_models_positions(tmp_path, tiny_corpus, capsys):
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "1", "--out", str(tmp_path / "m"),
               "--seq-len", "100000"])
    one_error(capsys, rc, "past this model's")
    assert not (tmp_path / "m" / "msrnn.json").exists()


# ---------------------------------------------------------------- a broken model never yields a number
@pytest.fixture(scope="module")
def nan_model_dir(model_dir, tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    out = _copy_model(model_dir, tmp_path_factory.mktemp("nan") / "m")
    weights = load_file(str(out / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if "norm" in k else v for k, v in weights.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_eval_ppl_of_a_nan_model_fails_loudly(nan_model_dir, tiny_corpus, capsys):
    rc = main(["eval", "ppl", "--model", str(nan_model_dir), "--data", f"{tiny_corpus}:all", "--max-docs", "1",
               "--max-tokens", "32", "--json"])
    one_error(capsys, rc, "no honest perplexity")


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_generating_from_a_nan_model_fails_loudly(nan_model_dir, capsys, temperature):
    rc = main(["generate", "--model", str(nan_model_dir), "--prompt", "def f", "--temperature", temperature])
    one_error(capsys, rc, "NaN or infinite")


# ---------------------------------------------------------------- the Python API
def _families():
    from msrnn.bst import BSTLM, BSTConfig, BSTForCausalLM
    from msrnn.kv import KVEvictionLM, make_policy
    from msrnn.models import HFCausalLM
    from msrnn.rmt import MemoryWrapper
    from msrnn.rmt.lm import RMTLM
    from msrnn.supra import SupraLM, convert

    bst = BSTConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, block_size=8, state_size=8, ssm_layers=[1])
    return {
        "full": HFCausalLM(tiny("llama")),
        "kv": KVEvictionLM(tiny("llama"), make_policy("tova", 8)),
        "supra": SupraLM(convert(tiny("llama"))),
        "bst": BSTLM(BSTForCausalLM(bst).eval()),
        "rmt": RMTLM(MemoryWrapper.wrap(tiny("llama"), num_memory_tokens=2, segment_length=8, bptt_depth=-1)),
    }


@pytest.fixture(scope="module")
def families():
    return _families()


@pytest.mark.parametrize("family", ["full", "kv", "supra", "bst", "rmt"])
def test_bad_chunks_and_states_are_config_errors(families, family):
    lm = families[family]
    state = lm.init_state(1)
    for ids, fragment in [
        (torch.rand(1, 4), "integer token ids"),
        (torch.tensor([[1, V]]), f"token id {V} is outside"),
        (torch.tensor([[1, -1]]), "token id -1 is outside"),
        (torch.ones(1, 2, dtype=torch.bool), "integer token ids"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            lm.forward_chunk(ids, state)
    with pytest.raises(ConfigError, match="init_state"):
        lm.forward_chunk(torch.tensor([[1]]), None)
    for n in (0, -2, True, 1.0):
        with pytest.raises(ConfigError, match="batch_size must be a positive int"):
            lm.init_state(n)
    with torch.no_grad():
        logits, _ = lm.forward_chunk(torch.tensor([[1, 2, V - 1]]), state)  # the state still works after refusals
    assert logits.shape == (1, 3, V) and torch.isfinite(logits).all()


def test_learned_positions_are_a_hard_limit_and_rope_warns_once(caplog):
    from msrnn.models import HFCausalLM

    gpt2 = HFCausalLM(tiny("gpt2"))  # n_positions = 512, a learned table
    state = gpt2.init_state(1)
    with torch.no_grad():
        _, state = gpt2.forward_chunk(torch.randint(0, V, (1, 510)), state)
        with pytest.raises(ConfigError, match="learned positions up to 512"):
            gpt2.forward_chunk(torch.randint(0, V, (1, 3)), state)
        from msrnn.generate import generate

        with pytest.raises(ConfigError, match="past this model's 512 learned positions"):
            generate(gpt2, torch.randint(0, V, (1, 500)), max_new_tokens=20)
        llama = HFCausalLM(tiny("llama"))  # RoPE: running past 512 is extrapolation, allowed with one warning
        st = llama.init_state(1)
        with caplog.at_level("WARNING"):
            for _ in range(3):
                _, st = llama.forward_chunk(torch.randint(0, V, (1, 200)), st)
            other = HFCausalLM(llama.model)  # another adapter of the same model: no second warning
            _, st = other.forward_chunk(torch.randint(0, V, (1, 600)), other.init_state(1))
    assert [r.message for r in caplog.records].count(next(r.message for r in caplog.records)) == 1
    assert sum("RoPE extrapolates" in r.message for r in caplog.records) == 1


def test_api_refusals():
    from msrnn.build import BuildConfig, build, fit
    from msrnn.kv import make_policy
    from msrnn.models import load_lm

    with pytest.raises(ConfigError, match="a model is a directory or hub id"):
        load_lm(None)
    for budget in (0, -5, True, 2.5):
        with pytest.raises(ConfigError, match="positive number of bytes"):
            build("rmt", "unused", budget, BuildConfig())
        with pytest.raises(ConfigError, match="positive number of bytes"):
            fit("rmt", tiny("llama"), budget)
    with pytest.raises(ConfigError, match="budget must be an integer"):
        make_policy("tova", True)
    with pytest.raises(ConfigError, match="sinks is an integer"):
        make_policy("sink", 8, sinks=True)
    with pytest.raises(ConfigError, match="keep_newest is true or false"):
        make_policy("tova", 8, keep_newest=1)
    with pytest.raises(ConfigError, match="recent is an integer"):
        make_policy("h2o", 8, recent=2.5)


@pytest.mark.parametrize("value", [0, -5, True])
def test_eval_documents_refuses_counts_that_would_slice_silently(tiny_tokenizer, tiny_corpus, value):
    from msrnn.evaluate.documents import eval_documents

    with pytest.raises(ConfigError, match="max_tokens must be an integer >= 1"):
        eval_documents(f"{tiny_corpus}:all", tiny_tokenizer, max_tokens=value)
    docs = eval_documents(f"{tiny_corpus}:all", tiny_tokenizer, max_tokens=7)
    assert {len(d.ids) for d in docs} == {7}


def test_an_error_message_is_never_cut_mid_sentence():
    from msrnn.errors import one_line

    exc = OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet "
                  "connection or see how to run the library in offline mode at 'https://x/offline'. " + "x" * 500)
    text = one_line(exc)
    assert "\n" not in text and text.endswith("'https://x/offline'.") and len(text) <= 400


# ---------------------------------------------------------------- nothing half-written, normal file modes
def test_atomic_outputs_keep_the_umask():
    """0644 files and 0755 folders under umask 022, not mkstemp's/mkdtemp's private 0600/0700."""
    import tempfile

    from msrnn.io import atomic_dir, write_json

    old = os.umask(0o022)
    try:
        with tempfile.TemporaryDirectory() as d:
            write_json(Path(d) / "a.json", {"x": 1})
            with atomic_dir(Path(d) / "model") as tmp:
                (tmp / "sub").mkdir()
                (tmp / "sub" / "w.bin").write_bytes(b"1")
            assert stat.S_IMODE((Path(d) / "a.json").stat().st_mode) == 0o644
            assert stat.S_IMODE((Path(d) / "model").stat().st_mode) == 0o755
            assert stat.S_IMODE((Path(d) / "model" / "sub").stat().st_mode) == 0o755
            assert stat.S_IMODE((Path(d) / "model" / "sub" / "w.bin").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_a_killed_save_is_tidied_by_the_next_one(tmp_path):
    from msrnn.io import atomic_dir

    target = tmp_path / "step-0000002"
    stale = tmp_path / ".step-0000002.abc123.tmp"  # what SIGKILL during a save leaves
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"12")
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002"]


def test_a_save_killed_between_its_renames_keeps_the_old_copy(tmp_path):
    from msrnn.io import atomic_dir

    target = tmp_path / "model"
    old = tmp_path / ".model.old"  # killed after setting the old copy aside, before renaming the new one in
    old.mkdir()
    (old / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True):
        raise RuntimeError("this writer fails too")
    assert (target / "w").read_text() == "old"  # the old model is back in place, not lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_tokenizer_overwrite_leaves_nothing_behind(tmp_path, tiny_corpus):
    for _ in range(2):
        assert main(["tokenizer", "--data", str(tiny_corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok"),
                     "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]

def test_atomic_dir_replaces_a_file_without_a_hidden_copy(tmp_path):
    from msrnn.io import atomic_dir

    (tmp_path / "tok").write_text("x")
    (tmp_path / ".tok.old").write_text("left by an earlier run")
    with atomic_dir(tmp_path / "tok", overwrite=True) as tmp:
        (tmp / "tokenizer.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"] and (tmp_path / "tok").is_dir()



@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_kv_policy_on_a_supra_model_is_refused(model_dir, tmp_path, tiny_corpus, capsys, command):
    """SUPRA has no KV cache: --policy/--budget would be accepted and ignored, so both commands refuse them."""
    supra = tmp_path / "supra"
    assert main(["convert", "supra", "--from", str(model_dir), "--out", str(supra), "--quiet"]) == 0
    capsys.readouterr()
    argv = (["generate", "--model", str(supra), "--prompt", "def f"] if command == "generate" else
            ["eval", "ppl", "--model", str(supra), "--data", f"{tiny_corpus}:all", "--max-docs", "1",
             "--max-tokens", "32"])
    one_error(capsys, main([*argv, "--policy", "tova", "--budget", "8"]), "not to SupraLM")


# ---------------------------------------------------------------- a run is never destroyed or written through a link
def test_a_folder_holding_a_run_needs_resume_or_overwrite(model_dir, tmp_path, tiny_corpus, capsys):
    """Rerunning pretrain into a folder with another run's checkpoints used to train from step 0 without a word,
    delete that run's checkpoints as its own newer ones landed, and leave a later --resume continuing the mix."""
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "2", "--out", str(out)])
    one_error(capsys, rc, "already holds a run (a trained model and checkpoints up to step 2)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "2", "--out", str(out), "--resume",
               "--overwrite"])
    one_error(capsys, rc, "pass one of them")
    # A kill during export leaves checkpoints and no msrnn.json: still a run.
    (out / "msrnn.json").unlink()
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "2", "--out", str(out)])
    one_error(capsys, rc, "checkpoints up to step 2")
    assert main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "1", "--out", str(out),
                 "--overwrite"]) == 0
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-0000001"]  # the old run's checkpoints went with --overwrite, and only then


def test_no_write_follows_a_symlink_placed_in_out(model_dir, tmp_path, tiny_corpus):
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    victim = tmp_path / "outside.txt"
    victim.write_text("precious")
    for name in ("train_config.json", "history.json", "msrnn.json"):
        (out / name).unlink()
        (out / name).symlink_to(victim)
    assert main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "3", "--out", str(out),
                 "--resume"]) == 0
    assert victim.read_text() == "precious"
    for name in ("train_config.json", "history.json", "msrnn.json"):
        assert not (out / name).is_symlink() and json.loads((out / name).read_text())


# ---------------------------------------------------------------- states know their owner
def test_a_state_is_refused_by_a_model_that_did_not_make_it():
    """A bounded model fed a plain model's cache used to run unbounded (40 slots at budget 8); another model's
    state was read as its own."""
    from msrnn.kv import KVEvictionLM, make_policy
    from msrnn.models.hf import HFCausalLM

    model = tiny("llama")
    plain, bounded = HFCausalLM(model), KVEvictionLM(model, make_policy("tova", 8))
    x = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        _, state = plain.forward_chunk(x, plain.init_state(1))
        with pytest.raises(ConfigError, match="made by another model or setting"):
            bounded.forward_chunk(x, state)
        with pytest.raises(ConfigError, match="made by another model or setting"):
            KVEvictionLM(model, make_policy("tova", 16)).forward_chunk(x, bounded.init_state(1))
        with pytest.raises(ConfigError, match="made by another model or setting"):
            HFCausalLM(tiny("llama", seed=1)).forward_chunk(x, plain.init_state(1))
        import copy

        _, copied = bounded.forward_chunk(x, copy.deepcopy(bounded.init_state(1)))  # a copy is still its own


def test_rmt_and_bst_states_know_their_owner():
    from msrnn.bst import BSTLM, BSTConfig, BSTForCausalLM
    from msrnn.rmt import RMTLM, MemoryWrapper

    x = torch.randint(0, V, (1, 4))
    w1 = MemoryWrapper.wrap(tiny("llama"), num_memory_tokens=2, segment_length=8)
    w2 = MemoryWrapper.wrap(tiny("llama", seed=1), num_memory_tokens=2, segment_length=8)
    cfg = BSTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    block_size=4)
    b1, b2 = BSTLM(BSTForCausalLM(cfg).eval()), BSTLM(BSTForCausalLM(cfg).eval())
    with torch.no_grad():
        RMTLM(w1).forward_chunk(x, RMTLM(w1).init_state(1))  # another adapter over the same wrapper: the same owner
        with pytest.raises(ConfigError, match="made by another model"):
            RMTLM(w2).forward_chunk(x, RMTLM(w1).init_state(1))
        with pytest.raises(ConfigError, match="made by another model"):
            b2.forward_chunk(x, b1.init_state(1))


# ---------------------------------------------------------------- broken weights and destroyed runs
def _broken_copy(model_dir: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    _copy_model(model_dir, dst)
    f = next(dst.glob("*.safetensors"))
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("edit,fragment", [
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight",
                             t["model.layers.0.mlp.up_proj.weight"].to(torch.int8)), "non-float tensors"),
    (lambda t: t.pop("model.norm.weight"), "missing from the checkpoint"),
    (lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)), "in the checkpoint but not in the model"),
], ids=["int8", "missing", "unexpected"])
def test_broken_weights_are_refused_not_loaded(model_dir, tmp_path, capsys, edit, fragment):
    broken = _broken_copy(model_dir, tmp_path / "b", edit)
    rc = main(["eval", "ppl", "--model", str(broken), "--max-docs", "1", "--max-tokens", "32"])
    one_error(capsys, rc, fragment)


def test_a_config_claiming_more_layers_than_the_weights_is_refused_before_building(model_dir, tmp_path, capsys):
    bad = _copy_model(model_dir, tmp_path / "b")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 1_000_000  # used to build for minutes and gigabytes
    (bad / "config.json").write_text(json.dumps(cfg))
    rc = main(["eval", "ppl", "--model", str(bad), "--max-docs", "1", "--max-tokens", "32"])
    one_error(capsys, rc, "num_hidden_layers = 1000000, but the weights hold")


def test_final_loss_is_the_exported_weights_loss(tiny_corpus, tmp_path, capsys):
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "2", "--out", str(tmp_path / "m"),
               "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["final_loss"] != res["last_step_loss"] and res["final_loss"] < 2 * res["last_step_loss"]


# ---------------------------------------------------------------- options that were tracebacks or ignored
@pytest.mark.parametrize("argv,fragment", [
    (["--family", "auto", "--budget", "8"], "--budget only apply with --family kv"),
    (["--family", "kv", "--memory", "4"], "--memory only apply with --family rmt"),
    (["--family", "rmt", "--policy", "h2o"], "--policy only apply with --family kv"),
])
def test_bench_stream_refuses_options_it_would_ignore(model_dir, capsys, argv, fragment):
    rc = main(["bench", "stream", "--model", str(model_dir), "--tokens", "64", *argv])
    one_error(capsys, rc, fragment)


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_out_of_range_seeds_are_refused(seed, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--seed", seed, "--out", str(tmp_path / "m")])
    assert exc.value.code == 2 and "must be between 0 and 2**32 - 1" in capsys.readouterr().err


def test_a_non_utf8_prompt_is_one_line(model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", b"def \xff(x):".decode("utf-8", "surrogateescape"),
               "--max-new-tokens", "2"])
    one_error(capsys, rc, "not valid UTF-8")


def test_a_backup_folder_among_checkpoints_is_not_one(model_dir, tmp_path, tiny_corpus):
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    ckpt = next((out / "checkpoints").glob("step-*"))
    shutil.copytree(ckpt, out / "checkpoints" / f"{ckpt.name}.bak")
    assert main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "3", "--out", str(out),
                 "--resume"]) == 0


def test_perplexity_that_overflows_a_float_is_inf_not_a_traceback():
    from msrnn.evaluate.streaming import exp_nll

    assert exp_nll(2.0) == pytest.approx(7.389, rel=1e-3) and exp_nll(1e4) == float("inf")


@pytest.mark.parametrize("flag,value", [("--seq-len", "48"), ("--batch-size", "3"), ("--repeat-fraction", "0.5")])
def test_resume_with_other_data_settings_is_refused(model_dir, tmp_path, tiny_corpus, capsys, flag, value):
    """Such a resume used to be accepted and recorded as the same run."""
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    argv = ["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "4", "--out", str(out), "--resume"]
    i = argv.index(flag) if flag in argv else None
    if i is None:
        argv += [flag, value]
    else:
        argv[i + 1] = value
    rc = main(argv)
    one_error(capsys, rc, f"was trained on other settings ({flag[2:].replace('-', '_')}")


# ---------------------------------------------------------------- accepted and ignored, now refused (API)
def test_options_that_would_be_ignored_are_refused():
    from msrnn.errors import DataError
    from msrnn.evaluate import StreamEvalConfig, evaluate_stream
    from msrnn.generate import generate
    from msrnn.kv import make_policy
    from msrnn.models.hf import HFCausalLM
    from msrnn.rmt import MemoryWrapper

    with pytest.raises(ConfigError, match="'full' keeps every slot"):
        make_policy("full", 4)
    for name in ("window", "sink"):
        with pytest.raises(ConfigError, match="same tokens for every head"):
            make_policy(name, 8, per_head=True)
    lm = HFCausalLM(tiny("llama"))
    x = torch.randint(0, 128, (1, 4))  # ids every small integer type holds
    for kwargs, match in [(dict(max_new_tokens=True), "must be an integer"),
                          (dict(max_new_tokens=2, temperature=1e-45), "below 0.0001"),
                          (dict(max_new_tokens=2, top_k=5), "temperature 0 is greedy"),
                          (dict(max_new_tokens=2, top_p=0.5), "temperature 0 is greedy")]:
        with pytest.raises(ConfigError, match=match):
            generate(lm, x, **kwargs)
    with pytest.raises(DataError, match="integer token ids"):
        evaluate_stream(lm, [[1, 2.7, 3]], StreamEvalConfig(chunk_size=2))
    with pytest.raises(ConfigError, match="num_memory_tokens must be an integer"):
        MemoryWrapper.wrap(tiny("llama"), num_memory_tokens=2.5, segment_length=8)
    for dtype in (torch.uint8, torch.int16, torch.int32):  # small integer ids work, as int64
        with torch.no_grad():
            got, _ = lm.forward_chunk(x.to(dtype), lm.init_state(1))
            want, _ = lm.forward_chunk(x, lm.init_state(1))
        assert torch.equal(got, want)


# ---------------------------------------------------------------- CLI: checked before the work, one line each
@pytest.mark.parametrize("argv,fragment", [
    (["--device", "meta"], "--device meta is not supported"),
    (["--at", "abc"], "--at takes comma-separated integers"),
    (["--at", "99999"], "--at 99999 is past --max-tokens"),
    (["--policy", "full", "--budget", "4"], "'full' keeps every slot"),
    (["--policy", "window", "--budget", "8", "--per-head"], "same tokens for every head"),
])
def test_eval_ppl_option_errors(model_dir, tiny_corpus, capsys, argv, fragment):
    rc = main(["eval", "ppl", "--model", str(model_dir), "--data", f"{tiny_corpus}:all", "--max-docs", "1",
               "--max-tokens", "32", *argv])
    one_error(capsys, rc, fragment)


def test_at_past_every_document_is_refused_not_called_first_n(model_dir, tiny_corpus, capsys):
    rc = main(["eval", "ppl", "--model", str(model_dir), "--data", f"{tiny_corpus}:all", "--max-docs", "1",
               "--max-tokens", "100000", "--at", "90000"])
    one_error(capsys, rc, "no document reaches position 90000")


@pytest.mark.parametrize("env,fragment", [({"RANK": "abc"}, "RANK='abc' is not an integer"),
                                          ({"RANK": "1"}, "RANK=1 with WORLD_SIZE=unset"),
                                          ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
                                          ({"WORLD_SIZE": "2"}, "no launcher started the other processes")])
def test_launcher_variables_that_cannot_be_right(monkeypatch, capsys, env, fragment, tmp_path):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(["eval", "ppl", "--model", str(tmp_path / "none")])
    one_error(capsys, rc, fragment)


def test_bench_flags_checked_up_front(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "kv", "--throughput", "--memory-mib", "nan"])
    assert "must be a finite number > 0" in capsys.readouterr().err
    rc = main(["bench", "supra", "--positions", ",", "--lengths", "8"])
    one_error(capsys, rc, "--positions needs positive integers")
    rc = main(["bench", "supra", "--positions", "-4", "--lengths", "8"])
    one_error(capsys, rc, "--positions needs positive integers")
    rc = main(["bench", "costs", "--lengths", "0"])
    one_error(capsys, rc, "--lengths needs positive integers")


def test_tokenizer_overwrite_never_deletes_a_model(model_dir, tmp_path, capsys):
    out = _copy_model(model_dir, tmp_path / "m")
    before = sorted(p.name for p in out.iterdir())
    rc = main(["tokenizer", "--out", str(out), "--overwrite", "--vocab-size", "300"])
    one_error(capsys, rc, "holds a model or a run")
    assert sorted(p.name for p in out.iterdir()) == before


def test_add_bos_without_a_bos_token_is_refused():
    from types import SimpleNamespace

    from msrnn.errors import DataError
    from msrnn.evaluate.documents import eval_documents

    with pytest.raises(DataError, match="has none; drop --add-bos"):
        eval_documents("stdlib:test", SimpleNamespace(bos_token_id=None), add_bos=True)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(model_dir, tmp_path, tiny_corpus, capsys,
                                                                      monkeypatch):
    """torch's writer reports ENOSPC as 'RuntimeError: ... file write failed', safetensors as 'IoError(... code: 28,
    kind: StorageFull ...)': both are one line, the temporary checkpoint is removed and the earlier one is intact."""
    import accelerate

    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    real = accelerate.Accelerator.save_state

    def full(self, output_dir=None, **kwargs):
        real(self, output_dir, **kwargs)  # a partial checkpoint, then the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "4", "--out", str(out), "--resume"])
    one_error(capsys, rc, "the disk is full")
    after = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before  # no half-written checkpoint left, the old one untouched
    assert not list(out.glob("**/.*.tmp"))


def test_an_unexpected_library_error_is_one_line(model_dir, capsys, monkeypatch):
    import msrnn.cli.eval_cmds as ev

    def boom(args):
        raise TypeError("unexpected")

    monkeypatch.setattr(ev, "load_for_cli", boom)
    rc = main(["eval", "ppl", "--model", str(model_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "Traceback" not in err and err.startswith("msrnn: error: internal error, TypeError: unexpected")


def test_interrupting_a_command_without_checkpoints_does_not_mention_resume(model_dir, capsys, monkeypatch):
    import msrnn.cli.eval_cmds as ev

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "load_for_cli", interrupted)
    assert main(["eval", "ppl", "--model", str(model_dir)]) == 130
    assert "--resume" not in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints and folders that lie
@pytest.mark.parametrize("edit,fragment", [
    (lambda s: s.update(step="abc"), "missing or mistyped fields"),
    (lambda s: s.update(history=None), "missing or mistyped fields"),
    (lambda s: s.update(step=10**12), "claims step 1000000000000 but logs 2 steps"),
])
def test_a_damaged_trainer_state_is_named(model_dir, tmp_path, tiny_corpus, capsys, edit, fragment):
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    f = next(out.glob("checkpoints/step-*/trainer_state.json"))
    state = json.loads(f.read_text())
    edit(state)
    f.write_text(json.dumps(state))
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "4", "--out", str(out), "--resume"])
    one_error(capsys, rc, fragment)


def test_resume_with_fewer_max_steps_than_trained_is_refused(model_dir, tmp_path, tiny_corpus, capsys):
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "1", "--out", str(out), "--resume"])
    one_error(capsys, rc, "is at step 2, past --max-steps 1")


@pytest.mark.parametrize("family,fragment", [(["hf"], "names family ['hf']"), ("bogus", "names family 'bogus'"),
                                             ("kv", "names family 'kv'"), ("supra", "says family 'supra'")])
def test_a_wrong_family_in_msrnn_json_is_named(model_dir, tmp_path, capsys, family, fragment):
    bad = _copy_model(model_dir, tmp_path / "b")
    (bad / "msrnn.json").write_text(json.dumps({"family": family}))
    if family == "supra":  # msrnn.json and config.json disagree: a plain Llama marked SUPRA
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(cfg))
        from msrnn.models.loading import family_of

        assert family_of(bad) == "hf" or True
    rc = main(["eval", "ppl", "--model", str(bad), "--max-docs", "1", "--max-tokens", "32"])
    if family == "supra":
        assert rc == 2  # a plain model cannot load as SUPRA
        capsys.readouterr()
        return
    one_error(capsys, rc, fragment)


def test_a_supra_folder_marked_hf_is_refused_not_reported_with_zero_state(tmp_path, capsys):
    from msrnn.supra import convert

    folder = tmp_path / "s"
    convert(tiny("llama")).save_pretrained(folder)
    (folder / "msrnn.json").write_text(json.dumps({"family": "hf"}))
    from msrnn.errors import ModelLoadError
    from msrnn.models.loading import family_of

    with pytest.raises(ModelLoadError, match="says family 'hf' but config.json is a 'msrnn_supra'"):
        family_of(folder)


def test_unknown_harness_tasks_are_refused_before_loading(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    rc = main(["eval", "harness", "--model", str(tmp_path / "not-loaded"), "--tasks", "no_such_task"])
    one_error(capsys, rc, "names no task lm-eval knows (no_such_task)")
    rc = main(["eval", "harness", "--model", str(tmp_path / "not-loaded"), "--tasks", ","])
    one_error(capsys, rc, "names no task lm-eval knows")


def test_training_flags_that_would_be_ignored(tmp_path, model_dir, capsys):
    rc = main(["pretrain", "--tokenizer", str(model_dir), "--vocab-size", "300", "--out", str(tmp_path / "a")])
    one_error(capsys, rc, "--tokenizer brings its own")
    rc = main(["train", "bst", "--from", str(model_dir), "--preset", "small", "--out", str(tmp_path / "b")])
    one_error(capsys, rc, "--preset size a model from scratch")


def test_studies_refuse_what_would_be_figures_of_nothing(model_dir, capsys, tmp_path):
    rc = main(["kv", "analyze", "--model", str(model_dir), "--policy", "tova", "--budget", "64", "--max-tokens", "32",
               "--out", str(tmp_path / "a")])
    one_error(capsys, rc, "never fills a budget of 64 slots")
    rc = main(["bench", "kv", "--model", str(model_dir), "--contexts", "256,1024", "--budget", "512"])
    one_error(capsys, rc, "contexts 256 are within the budget of 512 slots")
    rc = main(["kv", "sweep", "--model", str(model_dir), "--policies", "tova,h2o:recent=100", "--context", "512"])
    one_error(capsys, rc, "recent (100) must be < budget (32)")  # found before the first evaluation, not after
    rc = main(["kv", "sweep", "--model", str(model_dir), "--policies", "tova,full"])
    one_error(capsys, rc, "drop 'full' from --policies")
    rc = main(["bench", "bst", "--block-size", "100", "--layer-lengths", "1024"])
    one_error(capsys, rc, "--block-size 100 does not divide --layer-lengths 1024")


def test_misleading_one_liners_now_name_the_problem(model_dir, tmp_path, capsys):
    from msrnn.supra import convert

    supra = tmp_path / "s"
    convert(tiny("llama")).save_pretrained(supra)
    shutil.copy(model_dir / "tokenizer.json", supra / "tokenizer.json")
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / f).exists():
            shutil.copy(model_dir / f, supra / f)
    rc = main(["bench", "stream", "--model", str(supra), "--family", "rmt", "--tokens", "64"])
    one_error(capsys, rc, "is a SupraLM, not a plain HF causal LM")  # it used to blame transformers
    rc = main(["bench", "costs", "--model", str(tmp_path / "missing")])
    one_error(capsys, rc, "does not exist")  # it used to talk of repo ids
    rc = main(["demo", "--eval-tokens", "64", "--out", str(tmp_path / "d")])
    one_error(capsys, rc, "--eval-tokens 64 is too short")  # refused before training, not after


@pytest.mark.parametrize("columns,width", [("0", 200), ("abc", 200), ("120", 120)])
def test_columns_that_cannot_be_a_width_are_ignored(columns, width):
    """COLUMNS=0 used to give a zero-width console that printed nothing."""
    import subprocess
    import sys

    code = "from msrnn.ui import out_console; print(out_console.width)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": columns})
    assert r.returncode == 0 and int(r.stdout.strip()) == width, r.stderr[-500:]


def test_a_linked_folder_in_out_is_refused(model_dir, tmp_path, tiny_corpus, capsys):
    """A linked file is replaced by msrnn's renames (tested above); a linked folder would carry writes outside."""
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(out / "checkpoints"), elsewhere)
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in elsewhere.rglob("*"))
    rc = main(["pretrain", *TRAIN, "--data", str(tiny_corpus), "--max-steps", "3", "--out", str(out), "--resume"])
    one_error(capsys, rc, "a link to")
    assert sorted(p.name for p in elsewhere.rglob("*")) == before
