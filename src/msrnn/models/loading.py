"""Load a model directory (or hub id) as a StatefulLM, with one clear error for every way it can fail.

A directory made by any msrnn command holds ``msrnn.json`` naming its family; each family's spec in
:data:`msrnn.families.FAMILIES` loads it. A directory without it is treated as a plain HF causal LM (full
KV cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from msrnn.errors import ConfigError, ModelLoadError, one_line
from msrnn.families import FAMILIES, family_of_model_type, modeling_modules
from msrnn.protocol import StatefulLM

MSRNN_META = "msrnn.json"

# Encoder-only families that transformers can also build "for causal LM" when configured as decoders; a
# checkpoint of one of them without is_decoder=True is an encoder and has no usable next-token head.
ENCODER_FAMILIES = {"bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "albert",
                     "camembert", "ernie", "mpnet", "modernbert"}

# model_type -> the module that registers it with transformers' Auto classes (imported only when needed).
MODEL_TYPE_MODULES = modeling_modules()


def is_encoder_only(config: Any) -> bool:
    """An encoder family not configured as a decoder: no causal next-token head, no KV cache."""
    return config.model_type in ENCODER_FAMILIES and not getattr(config, "is_decoder", False)


def _model_type(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def ensure_registered(spec: str | Path) -> None:
    """Import the msrnn module that defines a saved model's config class, if it is one of ours."""
    import importlib

    module = MODEL_TYPE_MODULES.get(_model_type(Path(spec)) or "")
    if module:
        importlib.import_module(module)


def read_meta(path: Path) -> dict[str, Any]:
    """The directory's ``msrnn.json`` as a dict ({} when there is none)."""
    meta_path = path / MSRNN_META
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{meta_path} is corrupt ({exc}); re-create the model directory") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; re-create it")
    return meta


def load_tokenizer_for(spec: str | Path) -> Any:
    """The tokenizer stored with a model directory (or hub id)."""
    from transformers import AutoTokenizer

    reject_remote_code(spec)
    if Path(spec).is_dir():
        ensure_registered(spec)  # AutoTokenizer reads config.json; an unregistered model_type makes it warn
    try:
        return AutoTokenizer.from_pretrained(str(spec), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a missing/corrupt tokenizer
        raise ModelLoadError(
            f"no usable tokenizer at {spec} ({type(exc).__name__}); save one there with tokenizer.save_pretrained()"
        ) from None


# Files whose ``auto_map`` makes transformers import Python from the folder itself.
_CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def reject_remote_code(spec: str | Path) -> None:
    """Refuse a local folder that asks to run its own code (``auto_map``): msrnn never runs code from a folder. Hub
    ids are loaded with ``trust_remote_code=False``, so transformers refuses theirs."""
    path = Path(spec)
    if not path.is_dir():
        return
    for name in _CODE_MAPS:
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            raise ModelLoadError(f"{path} asks to run Python code from the folder ('auto_map' in {name}); msrnn never "
                                 "runs code from a model folder: remove auto_map, or use a model transformers ships")


def _check_dir(path: Path) -> None:
    reject_remote_code(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json; point --model at a directory made by save_pretrained")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({exc}); re-save the model") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} holds a JSON {type(config).__name__}, not an object; "
                             "re-save the model with save_pretrained")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(f"{path} has no weights (*.safetensors); the checkpoint is incomplete, re-save it")


def load_hf_causal_lm(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      attn_implementation: str | None = None) -> Any:
    """Load a ``PreTrainedModel`` causal LM from a directory or hub id, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    is_local = path.exists()
    if is_local:
        _check_dir(path)
    elif str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise ModelLoadError(f"model path {spec} does not exist; check the path or train one with 'msrnn pretrain'")
    if is_local:
        ensure_registered(path)
    try:
        config = AutoConfig.from_pretrained(str(spec), trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the config of {spec} ({type(exc).__name__}: {one_line(exc)})") from None
    if is_encoder_only(config) or type(config) not in AutoModelForCausalLM._model_mapping:
        raise ModelLoadError(
            f"{spec} is a {config.model_type!r} model, not a causal LM; "
            "use a decoder such as Llama, Mistral, Qwen2, GPT-2"
        )
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if is_local:
        check_weight_dtypes(path, getattr(config, "num_hidden_layers", None))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(spec), trust_remote_code=False,
                                                           output_loading_info=True, **kwargs)
    except Exception as exc:
        mismatch = _shape_mismatch(path, config) if is_local else None
        if mismatch:  # transformers points at a report that the CLI's quiet logging never shows: name it here
            raise ModelLoadError(f"{spec}'s weights are from another model size than its config.json ({mismatch}); "
                                 "re-save the model, or fix config.json") from None
        raise ModelLoadError(
            f"cannot load weights of {spec} ({type(exc).__name__}: {one_line(exc)}); "
            "the checkpoint may be corrupt or from another model size, re-save it"
        ) from None
    check_loading_info(spec, info)
    return model.to(device).eval()


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def check_weight_dtypes(path: Path, layers: Any = None) -> None:
    """Refuse weight files holding non-float tensors (int8, bool, ...): transformers would cast them into the model
    without a word (int8 weights of a float model load as garbage; quantised checkpoints need their own loader).
    ``layers`` (config.json's num_hidden_layers) must match the layers the weights hold: a config that claims a
    million layers would otherwise be built, for minutes and gigabytes, before the load failed."""
    import re

    from safetensors import safe_open

    held: set[int] = set()
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as fh:
                keys = list(fh.keys())
                bad = sorted(f"{k} ({d})" for k in keys if (d := fh.get_slice(k).get_dtype()) not in _FLOAT_DTYPES)
        except Exception as exc:  # noqa: BLE001 - a damaged file: the load reports it, named
            raise ModelLoadError(f"{f} is not a readable safetensors file ({type(exc).__name__}); re-save the "
                                 "model") from None
        if bad:
            raise ModelLoadError(f"{f.name} holds non-float tensors ({', '.join(bad[:3])}"
                                 f"{', ...' if len(bad) > 3 else ''}); msrnn loads float checkpoints only")
        held |= {int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", k))}
    if isinstance(layers, int) and held and layers != max(held) + 1:
        raise ModelLoadError(f"{path / 'config.json'} says num_hidden_layers = {layers}, but the weights hold "
                             f"{max(held) + 1} layers; fix config.json or re-save the model")


def check_loading_info(spec: str | Path, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not match the model: a missing tensor would be freshly initialised and
    an unexpected one dropped, both silently (transformers' own report is hidden by msrnn's log level)."""
    for key, what in (("missing_keys", "missing from the checkpoint (they would be randomly initialised)"),
                      ("unexpected_keys", "in the checkpoint but not in the model (they would be dropped)"),
                      ("mismatched_keys", "of another shape than the model's")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            raise ModelLoadError(f"{spec}: {len(names)} weight(s) {what}: {', '.join(names[:3])}"
                                 f"{', ...' if len(names) > 3 else ''}; re-save the model")


def _shape_mismatch(path: Path, config: Any) -> str | None:
    """The first tensor whose saved shape differs from what ``config`` builds, as 'name: saved vs expected'."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    saved = tuple(fh.get_slice(name).get_shape())
                    if name in expected and expected[name] != saved:
                        return f"{name}: saved {list(saved)} vs {list(expected[name])}"
    except Exception:  # best effort: the caller still reports the load failure itself
        return None
    return None


def load_full(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **_: Any) -> StatefulLM:
    """Load a plain HF causal LM (directory or hub id) with its full KV cache as an :class:`HFCausalLM`."""
    from msrnn.models.hf import HFCausalLM

    model = load_hf_causal_lm(spec, device=device, dtype=dtype)
    return HFCausalLM(model, tokenizer=load_tokenizer_for(spec))


def family_of(spec: str | Path) -> str:
    """The family a model directory belongs to: its config's model_type when that is an msrnn family's, else its
    ``msrnn.json`` (which must name a known family and agree with the config), else ``hf``."""
    path = Path(spec)
    if not path.is_dir():
        return "hf"
    by_type = family_of_model_type(_model_type(path))
    named = read_meta(path).get("family")
    if named is not None and (not isinstance(named, str) or named not in FAMILIES
                              or not FAMILIES.get(named).loadable):
        loadable = ", ".join(f.name for f in FAMILIES.values() if f.loadable)
        raise ModelLoadError(f"{path / MSRNN_META} names family {named!r}, which is not one msrnn loads ({loadable}); "
                             "fix it or re-create the model directory")
    if by_type is not None and named is not None and named != by_type.name:
        # A SUPRA folder marked "hf" would load as a plain model and report 0 state bytes.
        raise ModelLoadError(f"{path / MSRNN_META} says family {named!r} but config.json is a {_model_type(path)!r} "
                             f"({by_type.name}) model; fix msrnn.json or re-create the model directory")
    return by_type.name if by_type else (named or "hf")


def load_lm(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            **family_options: Any) -> StatefulLM:
    """Load ``spec`` (directory or hub id) as a StatefulLM of the family its ``msrnn.json`` (or config) names."""
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ConfigError(f"a model is a directory or hub id (a non-empty str or Path), got {spec!r}")
    family = FAMILIES.get(family_of(spec))
    if not family.loadable:
        raise ModelLoadError(f"{spec} names family {family.name!r}, which is applied to a model rather than loaded; "
                             "load the base model and apply it (msrnn.kv.apply_kv)")
    from msrnn.models.selfcheck import require_family_verified

    require_family_verified(family)  # msrnn's own families, checked once per installed versions (cached)
    return family.load(spec, device=device, dtype=dtype, **family_options)
