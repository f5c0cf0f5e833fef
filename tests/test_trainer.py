import pytest
import torch

from msrnn.errors import ConfigError, ModelLoadError
from msrnn.train import TrainConfig, Trainer


def make_trainer(out, steps, save_every=0, seed=0):
    from helpers import tiny

    model = tiny("llama", seed=seed).train()

    def batch_fn(step, micro, rank):
        g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
        x = torch.randint(0, 384, (2, 32), generator=g)
        return {"input_ids": x, "labels": x}

    cfg = TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=2, grad_accum=2, eval_every=0,
                      save_every=save_every, seed=seed)
    return Trainer(model, cfg, batch_fn, out, tokens_per_step=64, progress=False)


def test_resume_continues_the_same_loss_curve(tmp_path):
    straight = make_trainer(tmp_path / "a", 6).train()
    first = make_trainer(tmp_path / "b", 6, save_every=3)
    first.train(until=3)  # stop half way, as if interrupted after the step-3 checkpoint
    resumed = make_trainer(tmp_path / "b", 6)
    assert resumed.resume()
    assert resumed.step == 3
    result = resumed.train()
    a = [h["loss"] for h in straight.history]
    b = [h["loss"] for h in result.history]
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    assert a[-1] < a[0]  # it trains
    # No temp directories are left behind by atomic checkpoint writes.
    assert not [p for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    t = make_trainer(tmp_path, 1)
    t.train()
    ckpt = t.latest_checkpoint()
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="corrupt"):
        make_trainer(tmp_path, 2).resume()
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="incomplete"):
        make_trainer(tmp_path, 2).resume()


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert make_trainer(tmp_path, 1).resume() is False


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [cfg.lr_factor(s) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(f[10:], f[11:], strict=False))
    assert f[100] == pytest.approx(0.1)
    assert TrainConfig(max_steps=5, schedule="constant", warmup_steps=0).lr_factor(4) == 1.0


@pytest.mark.parametrize("kwargs,msg", [
    ({"max_steps": 0}, "max_steps"), ({"max_steps": 1, "lr": -1}, "lr"),
    ({"max_steps": 1, "schedule": "x"}, "schedule"),
    ({"max_steps": 1, "grad_accum": 0}, "grad_accum"), ({"max_steps": 1, "mixed_precision": "fp8"}, "mixed_precision"),
])
def test_bad_train_config(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kwargs)


def test_a_multi_process_cpu_launch_that_runs_one_process_is_refused(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process with MASTER_ADDR set and no WORLD_SIZE:
    refused, naming the launchers that do run N processes; a plain run and a real torchrun rank pass."""
    from msrnn.errors import ConfigError
    from msrnn.train.trainer import check_launch

    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(ConfigError, match="runs one process"):
        check_launch(1, simple)
    check_launch(1, {"ACCELERATE_USE_CPU": "True"})  # accelerate launch --cpu, one process asked for
    check_launch(1, {})  # a plain run
    check_launch(2, {**simple, "WORLD_SIZE": "2", "RANK": "0"})  # torchrun
    monkeypatch.setattr("os.environ", {**simple})
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N"):
        check_launch(1)


def test_only_rank_zero_prints_results():
    """Under torchrun every rank runs the CLI; results print once (rank 0), not once per rank."""
    import subprocess
    import sys

    code = "from msrnn.ui import print_json, out_console; print_json({'a': 1}); out_console.print('table')"
    for rank, want in (("0", True), ("1", False)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "RANK": rank}).stdout
        assert ('"a": 1' in out and "table" in out) == want, (rank, out)


def test_resume_refuses_another_world_size_and_a_missing_rng_file(tmp_path):
    """Each rank's RNG file and batch stream belong to one number of processes (Accelerate would skip a missing
    RNG file with a log line and resume another run): both are refused, naming the problem."""
    import json

    t = make_trainer(tmp_path, 1)
    t.train()
    ckpt = t.latest_checkpoint()
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    with pytest.raises(ConfigError, match="2 process"):
        make_trainer(tmp_path, 2).resume()
    state_file.write_text(json.dumps(state))
    (ckpt / "random_states_0.pkl").unlink()
    with pytest.raises(ModelLoadError, match="random_states_0.pkl"):
        make_trainer(tmp_path, 2).resume()
