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
    ({"max_steps": 1, "grad_accum": 0}, "grad_accum"), ({"max_steps": 1, "precision": "fp8"}, "precision"),
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
    # A rank of a 2-process torchrun whose Accelerate state was set up as one process (each would train alone).
    with pytest.raises(ConfigError, match="launcher started 2 processes but training sees one"):
        check_launch(1, {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"})
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


@pytest.mark.parametrize("precision", ["auto", "bf16-mixed", "bf16"])
def test_a_bf16_checkpoint_keeps_fp32_masters_so_tiny_updates_survive(tmp_path, precision, fresh_accelerator_state):
    """A bf16 checkpoint trains on fp32 master weights (and AdamW states) unless pure bf16 is asked for by name: at
    lr 1e-5 an update is far below a bf16 weight's rounding step, so in bf16 most weights never move, while the
    fp32 masters move everywhere. The export is written back in the dtype the checkpoint was loaded in."""
    from helpers import tiny
    from safetensors.torch import load_file

    model = tiny("llama", seed=0).to(torch.bfloat16).train()
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def batch_fn(step, micro, rank):
        x = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(step))
        return {"input_ids": x, "labels": x}

    cfg = TrainConfig(max_steps=3, lr=1e-5, warmup_steps=0, eval_every=0, weight_decay=0.0, precision=precision)
    trainer = Trainer(model, cfg, batch_fn, tmp_path, tokens_per_step=32, progress=False)
    trainer.train()
    weights = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    moved = sum(int((p.detach().float() != start[n]).sum()) for n, p in weights.items())
    total = sum(p.numel() for p in weights.values())
    if precision == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in weights.values())
        assert moved < 0.5 * total  # most updates are lost to rounding
    else:
        assert all(p.dtype == torch.float32 for p in weights.values())
        assert moved > 0.75 * total  # every weight with a gradient (not unused embedding rows) moved in fp32
        exp_avg = next(iter(trainer.optimizer.state.values()))["exp_avg"]
        assert exp_avg.dtype == torch.float32
    trainer.export(tmp_path / "model")
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}


def test_modules_a_model_keeps_in_fp32_stay_fp32_under_pure_bf16():
    """transformers' _keep_in_fp32_modules_strict (BST's SSM kernel) is honoured by --precision bf16."""
    from msrnn.train.trainer import cast_for_training

    class Model(torch.nn.Module):
        _keep_in_fp32_modules_strict = ["kernel"]

        def __init__(self):
            super().__init__()
            self.kernel = torch.nn.Linear(4, 4)
            self.proj = torch.nn.Linear(4, 4)

    m = Model()
    cast_for_training(m, "bf16")
    assert m.kernel.weight.dtype == torch.float32 and m.proj.weight.dtype == torch.bfloat16


def _family_model(family):
    from helpers import tiny

    from msrnn.bst import from_llama
    from msrnn.rmt import MemoryWrapper
    from msrnn.supra import convert

    if family == "supra":
        return convert(tiny("llama", seed=3), feature_dim=8)
    if family == "bst":
        return from_llama(tiny("llama", seed=3), block_size=8, state_size=4)
    return MemoryWrapper.wrap(tiny("llama", seed=3), num_memory_tokens=2, segment_length=16)


@pytest.mark.parametrize("family", ["supra", "bst", "rmt"])
def test_gradient_checkpointing_is_honoured_by_every_family(family):
    """gradient_checkpointing_enable() used to do nothing on SUPRA (its loop calls the layers' parts itself): every
    family now recomputes its layers in backward (--activation-checkpointing), with the same gradients and fewer
    activation bytes kept."""
    x = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    runs = {}
    for checkpointed in (False, True):
        model = _family_model(family).train()
        if checkpointed:
            from msrnn.train.trainer import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        kept = []

        def pack(t, kept=kept):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=x, labels=x)
            loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        runs[checkpointed] = (sum(kept), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, ckpt = runs[False], runs[True]
    assert ckpt[0] < 0.7 * plain[0], (family, ckpt[0], plain[0])
    assert plain[1].keys() == ckpt[1].keys()
    for name, g in plain[1].items():
        torch.testing.assert_close(ckpt[1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_an_accelerator_that_would_autocast_otherwise_is_refused(tmp_path, fresh_accelerator_state):
    """An Accelerator handed to the trainer keeps the mixed precision it was built with: one that disagrees with
    --precision is refused rather than silently training another way."""
    from accelerate import Accelerator
    from helpers import tiny

    acc = Accelerator(mixed_precision="bf16", cpu=True)
    cfg = TrainConfig(max_steps=1, eval_every=0, precision="fp32")
    with pytest.raises(ConfigError, match="mixed precision 'bf16' but precision 'fp32'"):
        Trainer(tiny("llama"), cfg, lambda s, m, r: {}, tmp_path, progress=False, accelerator=acc)


def test_report_to_sends_every_step_to_the_trackers(tmp_path, fresh_accelerator_state):
    """Trackers go through Accelerate: the run's settings once, every step's record (loss, lr, validation) with
    its step, and the run closed at the end. A tracker whose package is missing is refused before training."""
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker
    from helpers import tiny

    from msrnn.errors import ConfigError
    from msrnn.train import TrainConfig, Trainer

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.config, self.logged, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    def batch_fn(step, micro, rank):
        x = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(step))
        return {"input_ids": x, "labels": x}

    rec = Recorder()
    cfg = TrainConfig(max_steps=3, eval_every=2, warmup_steps=1, precision="fp32")
    t = Trainer(tiny("llama").train(), cfg, batch_fn, tmp_path / "run", progress=False,
                val_fn=lambda m: {"val_loss": 1.5}, accelerator=Accelerator(cpu=True, log_with=[rec]),
                run={"data": "stdlib", "shape": (2, 16)})
    t.train()
    assert [s for s, _ in rec.logged] == [1, 2, 3]
    assert set(rec.logged[0][1]) == {"loss", "lr"} and rec.logged[1][1]["val_loss"] == 1.5
    assert rec.logged[2][1]["loss"] == t.history[2]["loss"]
    assert rec.config["lr"] == cfg.lr and rec.config["data"] == "stdlib" and rec.config["shape"] == "[2, 16]"
    assert rec.finished
    from accelerate.utils import is_tensorboard_available

    if not is_tensorboard_available():
        with pytest.raises(ConfigError, match="needs the tensorboard package"):
            Trainer(tiny("llama").train(), TrainConfig(max_steps=1, report_to="tensorboard"), batch_fn,
                    tmp_path / "tb", progress=False)
    with pytest.raises(ConfigError, match="unknown tracker"):
        TrainConfig(max_steps=1, report_to="mlflow")
