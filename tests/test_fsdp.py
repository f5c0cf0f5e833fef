"""Sharded training on PyTorch FSDP2, on CPU with 2 gloo processes (fsdp_worker.py in a fresh interpreter): every
trainable family trains sharded, equals one unsharded process at the same global batch, resumes bit-exactly from
its DCP checkpoint, resumes under another number of processes, and exports one consolidated safetensors file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
FAMILIES = ["llama", "supra", "bst", "rmt"]


def _run_worker(out: Path, family: str, mode: str, procs: int = 2) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "fsdp_worker.py"), str(out), str(HERE), family, mode,
                           str(procs)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _unsharded_reference(tmp_path: Path, family: str) -> dict[str, torch.Tensor]:
    """The same 3 steps in this (single) process without FSDP: micro-batch m plays rank m, so the global batch and
    the averaged gradient are those of the 2-process run."""
    sys.path.insert(0, str(HERE))
    from fsdp_worker import batch, config, model

    from msrnn.train import Trainer

    t = Trainer(model(family).train(), config(fsdp=False, grad_accum=2), lambda s, m, r: batch(s, 0, m),
                tmp_path / "ref", progress=False)
    t.train()
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_on_two_processes_trains_resumes_reshards_and_exports(tmp_path, family, fresh_accelerator_state):
    from safetensors import safe_open

    _run_worker(tmp_path, family, "run")
    r0, r1 = (torch.load(tmp_path / f"run{i}.pt") for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # The trainer's chunked loss ran on the sharded model (RMT's forward takes no logits_to_keep: its own loss).
    assert (r0["fallback"] is None) == (family != "rmt")
    # Sharded: each rank holds about half of every unit's weights (the root's small tensors are split too).
    assert r0["local"] + r1["local"] == r0["total"] and max(r0["local"], r1["local"]) < 0.55 * r0["total"]
    # Interrupted at the step-2 checkpoint and resumed: the same run, bit for bit.
    assert r0["losses"][0] == r0["losses"][1] and len(r0["losses"][0]) == 3
    assert r0["straight"].keys() == r0["resumed"].keys()
    for k in r0["straight"]:
        assert torch.equal(r0["straight"][k], r0["resumed"][k]), k
    # A DCP checkpoint: the shards of every rank, each rank's RNG states, msrnn's JSON state.
    assert r0["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "rng_0.pt", "rng_1.pt",
                           "trainer_state.json"]

    # Equal to one unsharded process at the same global batch.
    ref = _unsharded_reference(tmp_path, family)
    for k, v in r0["straight"].items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=2e-5, msg=k)
    start = sys.modules["fsdp_worker"].model(family).state_dict()
    moved = any(not torch.equal(start[k], ref[k]) for k in ref)
    assert moved

    # The export: one consolidated safetensors file holding the trained weights, a tied weight once.
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for k in names:
            assert torch.equal(f.get_tensor(k), r0["straight"][k]), k
    tied = {"bst": {"lm_head.weight"}}.get(family, set())
    assert names == set(r0["straight"]) - tied

    # The 2-process checkpoint resumed by one process (micro-batches doubled: the same global batch).
    _run_worker(tmp_path, family, "reshard", procs=1)
    r = torch.load(tmp_path / "reshard0.pt")
    for k in r0["resumed"]:
        assert torch.equal(r["loaded"][k], r0["resumed"][k]), k
    assert any(not torch.equal(r["final"][k], r["loaded"][k]) for k in r["final"])
    assert r["resharded"] == [{"step": 3, "from": 2, "to": 1}]
    assert len(r["refused"]) == 2
    assert "keep the global batch with --grad-accum 2" in r["refused"][0]
    assert "written by sharded (--fsdp) training; resume it with --fsdp" in r["refused"][1]


class _Payload:
    """Unpickling this runs ``touch`` on a file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_dcp_metadata_file_is_refused_not_run(tmp_path):
    import pickle

    from msrnn.errors import ModelLoadError
    from msrnn.train.sharding import SafeReader

    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        SafeReader(str(tmp_path)).read_metadata()
    assert not marker.exists()


def test_a_crafted_value_in_a_dcp_checkpoint_is_refused_not_run(tmp_path):
    import io

    from msrnn.errors import ModelLoadError
    from msrnn.train.sharding import SafeLoadPlanner

    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    buf.seek(0)
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        SafeLoadPlanner().load_bytes(None, buf)
    assert not marker.exists()


def test_shard_units_are_the_modules_each_family_calls_whole():
    """FSDP gathers a unit's weights in a hook on the unit's forward, so the units must be what the model calls:
    SUPRA's loop calls each layer's attention and MLP (never the layer), the others call their layers."""
    sys.path.insert(0, str(HERE))
    from fsdp_worker import model

    from msrnn.errors import ConfigError
    from msrnn.train.sharding import shard_units

    supra = model("supra")
    assert shard_units(supra) == [m for layer in supra.model.layers for m in (layer.self_attn, layer.mlp)]
    llama = model("llama")
    assert shard_units(llama) == list(llama.model.layers)
    bst = model("bst")
    assert shard_units(bst) == list(bst.layers)
    rmt = model("rmt")
    assert shard_units(rmt) == list(rmt.model.model.layers)
    with pytest.raises(ConfigError, match="names no layers to shard"):
        shard_units(torch.nn.Linear(2, 2))
