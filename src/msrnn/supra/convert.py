"""Turn a pretrained Llama / Mistral / Qwen2 causal LM into a SupraForCausalLM, copying every original tensor.

:func:`convert` converts a live model; :func:`convert_dir` converts a model folder tensor by tensor (``msrnn convert
supra``): the SUPRA model is built once in the checkpoint's dtype and each stored tensor is read and copied in turn,
so the peak is one model plus one tensor, not the base model, a float32 SUPRA model and a cast copy of it. The two are
tested to give the same tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from msrnn.errors import ModelLoadError
from msrnn.supra.modeling import SupraConfig, SupraForCausalLM

log = logging.getLogger(__name__)

SUPPORTED = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True, "o_bias": False}}


def supra_config(cfg: Any, decay: str = "lightning", feature_map: str = "dense",
                 feature_dim: int | None = None) -> SupraConfig:
    """The SUPRA config of a softmax model's config (its shape, with SUPRA's attention settings)."""
    if cfg.model_type == SupraConfig.model_type:
        raise ModelLoadError("this model is already a SUPRA model; convert the original softmax model instead")
    if cfg.model_type not in SUPPORTED:
        raise ModelLoadError(f"cannot convert a {cfg.model_type!r} model; SUPRA conversion supports "
                             f"{', '.join(sorted(SUPPORTED))}")
    base = cfg.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "sliding_window",
                "use_sliding_window", "max_window_layers", "layer_types"):
        base.pop(key, None)
    return SupraConfig(decay=decay, feature_map=feature_map, feature_dim=feature_dim,
                       **SUPPORTED[cfg.model_type], **base)


def convert(model: Any, decay: str = "lightning", feature_map: str = "dense", seed: int = 0,
            feature_dim: int | None = None) -> SupraForCausalLM:
    """A SUPRA model with the base model's embeddings, norms, MLPs and q/k/v/o; phi is new (default init).

    ``feature_dim`` (default: the head dimension) is phi's width per head; the state is [H, feature_dim,
    head_dim] per layer, so it sets the state's size (``msrnn compare`` sizes SUPRA to a byte budget with it)."""
    cfg = model.config
    new_cfg = supra_config(cfg, decay, feature_map, feature_dim)
    supra = _init(new_cfg, seed, next(model.parameters()).dtype)
    source = model.state_dict()
    target = supra.state_dict()
    missing = [k for k in source if k not in target]
    if missing:
        raise ModelLoadError(f"cannot place base weights {missing[:3]} in the SUPRA model; unsupported variant")
    with torch.no_grad():
        for name, tensor in source.items():
            if target[name].shape != tensor.shape:
                raise ModelLoadError(f"shape mismatch for {name}: {tuple(tensor.shape)} vs {tuple(target[name].shape)}")
            target[name].copy_(tensor)
    if getattr(cfg, "tie_word_embeddings", False):
        supra.tie_weights()
    return supra.eval()


def _init(cfg: SupraConfig, seed: int, dtype: torch.dtype) -> SupraForCausalLM:
    """A SUPRA model initialised from ``seed`` directly in ``dtype`` (the values a float32 init rounded to it has:
    tested), so no float32 copy of the model is ever made."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SupraForCausalLM._from_config(cfg, dtype=dtype)


def convert_dir(path: str | Path, decay: str = "lightning", feature_map: str = "dense", seed: int = 0,
                feature_dim: int | None = None) -> SupraForCausalLM | None:
    """:func:`convert` of the model in folder ``path``, streamed from its safetensors files one tensor at a time.

    Returns None when the folder's tensors do not map one to one onto the model's (names transformers renames on
    load, weights not in safetensors): the caller then loads the model and converts it whole. The folder is checked
    as :func:`msrnn.models.loading.load_hf_causal_lm` checks it (no code from the folder, float weights, the layer
    count its config claims)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from msrnn.models.loading import _check_dir, check_weight_dtypes, ensure_registered

    path = Path(path)
    _check_dir(path)
    ensure_registered(path)
    files = sorted(path.glob("*.safetensors"))
    if not files or list(path.glob("pytorch_model*.bin")):
        return None
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    new_cfg = supra_config(cfg, decay, feature_map, feature_dim)
    check_weight_dtypes(path, getattr(cfg, "num_hidden_layers", None))
    with torch.device("meta"):  # the base model's tensor names and shapes, without its weights
        base = AutoModelForCausalLM.from_config(cfg)
    tied = getattr(cfg, "tie_word_embeddings", False)
    expect = {k: v.shape for k, v in base.state_dict().items()}
    stored: dict[str, Path] = {}
    dtypes = set()
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                stored[k] = f
                dtypes.add(fh.get_slice(k).get_dtype())
    # The tied head is stored once (under the embedding's name) or twice.
    head = {k for k in expect if k not in stored and tied and k.endswith("lm_head.weight")}
    if set(stored) - set(expect) or set(expect) - set(stored) - head or len(dtypes) != 1:
        log.info("%s: stored tensors do not map one to one onto the model; converting the loaded model", path)
        return None
    dtype = _DTYPES[dtypes.pop()]
    supra = _init(new_cfg, seed, dtype)
    target = supra.state_dict()
    with torch.no_grad():
        for f in files:
            _read_into(f, target)
    if tied:
        supra.tie_weights()
    return supra.eval()


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _read_into(file: Path, target: dict[str, torch.Tensor]) -> None:
    """Read every tensor of safetensors ``file`` straight into ``target``'s tensor of the same name (its bytes, by
    the offsets in the file's header), with neither a copy nor a memory map: a mapped file's pages would count as
    the process's memory while it is open. Each tensor's dtype and shape are checked against its target first."""
    import json
    import struct
    import sys

    with open(file, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dest = target[name]
            shape, (start, end) = tuple(entry["shape"]), entry["data_offsets"]
            if tuple(dest.shape) != shape:
                raise ModelLoadError(f"shape mismatch for {name}: {shape} vs {tuple(dest.shape)}; the weights are "
                                     "from another model size than config.json")
            if _DTYPES.get(entry["dtype"]) != dest.dtype or sys.byteorder != "little" or not dest.is_contiguous():
                raise ModelLoadError(f"{file.name}: {name} is {entry['dtype']}, the model holds {dest.dtype}; "
                                     "re-save the model in one dtype")
            buf = dest.view(-1).view(torch.uint8).numpy()  # the tensor's own bytes (safetensors is little-endian)
            if end - start != buf.nbytes:
                raise ModelLoadError(f"{file.name}: {name} holds {end - start} bytes, not {buf.nbytes}; the file "
                                     "is damaged, re-save the model")
            fh.seek(8 + size + start)
            if fh.readinto(memoryview(buf)) != buf.nbytes:
                raise ModelLoadError(f"{file.name} ends inside {name}; the file is truncated, re-save the model")
