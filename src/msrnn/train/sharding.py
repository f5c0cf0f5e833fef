"""Sharded training on PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) and its checkpoints (torch distributed
checkpoint, DCP).

Used by :class:`~msrnn.train.trainer.Trainer` when ``TrainConfig.fsdp`` is set. Accelerate's FSDP plugin does not
engage on CPU (it silently runs DDP), so msrnn calls FSDP2 itself, after Accelerate has started the process group;
the same code runs under ``torchrun`` on CPU (gloo, tested in CI) and on GPUs (NCCL).

- **Units.** Each unit's weights are gathered by a hook on the unit's own forward, so a unit must be a module the
  model calls as a whole. A model names its units with ``shard_units() -> list[nn.Module]`` (SUPRA calls its decoder
  layers' attention and MLP itself, so those are its units); otherwise the units are the modules of the classes the
  model lists in transformers' ``_no_split_modules`` (Llama's decoder layers, BST's layers; RMT's backbone layers).
  The root module is sharded last and holds the rest (embeddings and the tied head, norms, RMT's memory), so tied
  weights stay one parameter.
- **Checkpoints.** Every rank writes its own shards of the weights and of AdamW's states with ``dcp.save``; loading
  reshards, so a checkpoint resumes under another number of processes. DCP's reader unpickles its metadata and any
  non-tensor value with plain ``pickle``; msrnn reads them through :class:`SafeReader` and :class:`SafeLoadPlanner`,
  which accept only DCP's own metadata classes and plain values, so a crafted checkpoint is refused, not run.
- **Export.** The full weights are gathered to rank 0 (``get_model_state_dict(full_state_dict=True,
  cpu_offload=True)``) and written as safetensors by the trainer, a tied weight once.
"""

from __future__ import annotations

import io
import pickle
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from msrnn.errors import ConfigError, ModelLoadError

RNG_FILE = "rng_{rank}.pt"  # each rank's RNG states next to the DCP shards


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one (see the module doc): a model's own ``shard_units()``, else the
    modules of its ``_no_split_modules`` classes. A model with neither is refused by name."""
    for module in model.modules():
        if callable(getattr(module, "shard_units", None)):
            return list(module.shard_units())
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ConfigError(f"{type(model).__name__} names no layers to shard (no shard_units(), no "
                          "_no_split_modules); train it without --fsdp")
    return units


def mesh_for(accelerator: Any) -> Any:
    """A 1-D device mesh over every process (the process group Accelerate started)."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if accelerator.device.type == "cuda" else "cpu"
    return init_device_mesh(kind, (accelerator.num_processes,))


def shard(model: nn.Module, accelerator: Any) -> nn.Module:
    """Shard ``model`` in place over every process: each unit, then the root. Weights stay in the dtype they are
    held in (fp32 masters under bf16-mixed, whose forward runs under autocast as it does without FSDP)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        if accelerator.num_processes != 1:
            raise ConfigError("--fsdp needs a distributed launch (torchrun or accelerate launch); none was started")
        # One process (resuming a sharded checkpoint on one device, say): a group of one, in memory.
        dist.init_process_group("nccl" if accelerator.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    # FSDP2 warns when a sharded module returns a view (an in-place op on it would skip a hook); msrnn's losses
    # never modify a model's outputs in place, and RMT's forward returns slices of its memory by design.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # No model.to(device) first: fully_shard moves each unit's weights to the mesh's device as it shards them, so
    # a GPU holds one unit's full weights at a time, never the whole model.
    mesh = mesh_for(accelerator)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextmanager
def no_gradient_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Accumulate gradients locally inside the block (a micro-batch that is not the last of its step)."""
    if not skip:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def global_max_abs(model: nn.Module) -> dict[str, float]:
    """Each floating parameter's largest absolute entry over every rank's shard (NaN when any entry is NaN, inf when
    any is inf): one all-reduce for the whole model."""
    import torch.distributed as dist

    names, values = [], []
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        shard_ = local(p.detach())
        names.append(name)
        if shard_.numel() == 0:
            values.append(0.0)
        elif not torch.isfinite(shard_).all():
            values.append(float("inf") if not torch.isnan(shard_).any() else float("nan"))
        else:
            values.append(float(shard_.abs().max()))
    t = torch.tensor(values, dtype=torch.float64)
    nan = torch.isnan(t).to(torch.float64)
    if dist.is_initialized():
        t = torch.nan_to_num(t, nan=0.0)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.all_reduce(nan, op=dist.ReduceOp.MAX)
    t[nan > 0] = float("nan")
    return dict(zip(names, t.tolist(), strict=True))


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (on CPU), an empty dict elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ------------------------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Every rank writes its shards of the weights and optimizer states (DCP) and its RNG states into ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optim": optim}, storage_writer=dcp.FileSystemWriter(str(path)))
    torch.save(_rng_state(), Path(path) / RNG_FILE.format(rank=rank))


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a DCP checkpoint (its metadata file)."""
    return (Path(path) / ".metadata").is_file()


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> bool:
    """Load a DCP checkpoint into the sharded ``model`` and ``optimizer`` (resharded if it was written by another
    number of processes) and this rank's RNG states; returns whether this rank found its own RNG file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optim": optim}
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    except CheckpointException as wrapped:  # DCP gathers every rank's failure; name the first one
        exc = next(iter(wrapped.failures.values()))[0]
        if isinstance(exc, ModelLoadError):
            raise exc from None
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "mismatch" in text or "size" in text:
            raise ModelLoadError(f"checkpoint {path} holds weights of another model size; resume with the same "
                                 "--preset (and vocabulary) it was trained with") from None
        if "Missing key" in text or "missing" in text.lower():
            raise ModelLoadError(f"checkpoint {path} does not match the model ({text}); resume with the same "
                                 "--preset") from None
        raise ModelLoadError(f"checkpoint {path} is corrupt ({type(exc).__name__}: {text}); delete it and resume"
                             ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = Path(path) / RNG_FILE.format(rank=rank)
    if not rng_file.is_file():
        return False
    try:
        _set_rng_state(torch.load(rng_file, weights_only=True))
    except pickle.UnpicklingError:
        raise ModelLoadError(f"checkpoint {path}'s {rng_file.name} holds objects other than tensors and plain values; "
                             "refusing to unpickle it. Delete the checkpoint or retrain") from None
    return True


# DCP's metadata is a pickle of its own dataclasses; these are the only globals it may name.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size", "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
              "bool", "uint16", "uint32", "uint64"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},  # the checkpoint's own path, recorded by the writer
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, set()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a DCP checkpoint's metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader with its metadata unpickled through an allowlist (DCP itself uses plain ``pickle``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as exc:
                raise ModelLoadError(f"checkpoint {self.path}'s metadata is not DCP's ({exc}); refusing to unpickle "
                                     "it. Delete the checkpoint or retrain") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (optimizer hyper-parameters) read by ``torch.load(weights_only=True)``
    (DCP's own planner reads them with ``weights_only=False``)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise ModelLoadError("a value in the checkpoint holds objects other than tensors and plain values; "
                                 "refusing to unpickle it. Delete the checkpoint or retrain") from None
        # The same bytes loaded under the allowlist above: the base planner's unrestricted load can only call the
        # globals that load accepted.
        value.seek(0)
        super().load_bytes(read_item, value)
