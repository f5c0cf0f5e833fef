"""Every contract msrnn relies on in ``transformers``, in one place.

msrnn drives Hugging Face models through their extension points (``Cache`` layers, the attention-function and
attention-mask registries, Auto registration, ``generate``). Those are public, but their keyword names and
signatures move between minor releases: transformers 5.24 renamed the forward keyword ``past_key_values`` to
``cache`` (and the output field with it), which once made SUPRA drop its recurrent state between chunks with no
error. So:

* msrnn calls a model with a cache only through :func:`cache_kwargs` and reads it back through
  :func:`output_cache`; its own models accept either name through :func:`take_cache` and build their outputs
  with :func:`model_output`;
* every stateful forward checks that the state advanced (:func:`check_advanced`), so a contract that breaks
  in a future release raises instead of returning plausible numbers;
* :data:`CONTRACTS` lists each contract with a check; ``tests/test_compat.py`` runs them all, and
  :func:`check_transformers_version` refuses a release older than the range, and checks those contracts on a
  newer, untested one (refusing it only if one fails).

The tested range is :data:`TRANSFORMERS_RANGE` (also in ``pyproject.toml``; CI runs the suite at both ends).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import transformers
from packaging.version import Version

from msrnn.errors import MsrnnError

# Lowest supported and newest tested transformers. 5.4 is the first whose mask code calls
# ``get_mask_sizes(query_length)`` (5.3 passes ``cache_position``; on 5.2 eviction fails inside masking_utils).
# pyproject.toml declares the same range (``<TRANSFORMERS_BELOW``); CI runs the suite at both ends.
TRANSFORMERS_MIN = "5.4.0"
TRANSFORMERS_TESTED = "5.25.0"  # the newest release the whole suite passed on
TRANSFORMERS_BELOW = "5.26"
TRANSFORMERS_RANGE = f">={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}"

_NEWER_CHECKED: dict[str, str | None] = {}  # version -> None (contracts hold, warned once) or the failure


class CompatError(MsrnnError):
    """transformers no longer honours a contract msrnn relies on (or is older than msrnn supports)."""


def check_transformers_version(version: str | None = None) -> None:
    """Refuse a transformers release older than msrnn supports. A release newer than the newest tested one is
    not refused outright: msrnn checks every contract in :data:`CONTRACTS` on it (once per process), warns once,
    and refuses only if a contract fails; every model is then verified before eviction (:mod:`msrnn.kv.verify`)
    and every stateful forward checks that its state advanced."""
    if _IMPORT_ERROR is not None and version is None:
        first = (str(_IMPORT_ERROR).strip().splitlines() or [""])[0]
        raise CompatError(f"transformers {transformers.__version__} cannot import its own Llama model "
                          f"({type(_IMPORT_ERROR).__name__}: {first}); a package it uses does not match this release: "
                          f"reinstall it in a fresh environment with pip install 'transformers{TRANSFORMERS_RANGE}'")
    v = Version(version or transformers.__version__)
    if v < Version(TRANSFORMERS_MIN):
        raise CompatError(f"transformers {v} is older than msrnn supports (>={TRANSFORMERS_MIN}); upgrade with "
                          f"pip install 'transformers{TRANSFORMERS_RANGE}'")
    if v < Version(TRANSFORMERS_BELOW):
        return
    key = str(v)
    if key not in _NEWER_CHECKED:
        try:
            check_contracts()
            _NEWER_CHECKED[key] = None
            warnings.warn(f"transformers {v} is newer than the newest release msrnn is tested on "
                          f"({TRANSFORMERS_TESTED}); its contracts hold, and each model is verified before eviction",
                          stacklevel=2)
        except CompatError as exc:
            _NEWER_CHECKED[key] = str(exc)
    if _NEWER_CHECKED[key] is not None:
        raise CompatError(f"{_NEWER_CHECKED[key]} (tested: {TRANSFORMERS_RANGE}; install a tested release with pip "
                          f"install 'transformers{TRANSFORMERS_RANGE}')")


# --------------------------------------------------------------------------- the cache keyword
def _forward_params(fn: Callable) -> set[str]:
    fn = inspect.unwrap(fn)  # deprecate_kwarg wraps forward; the real parameters are underneath
    return set(inspect.signature(fn).parameters)


def _cache_kwarg() -> str:
    from transformers import LlamaForCausalLM

    params = _forward_params(LlamaForCausalLM.forward)
    if "cache" in params:
        return "cache"  # transformers >= 5.24
    if "past_key_values" in params:
        return "past_key_values"
    raise CompatError("LlamaForCausalLM.forward takes neither `cache` nor `past_key_values`; this transformers "
                      f"release ({transformers.__version__}) changed how caches are passed, and msrnn does not "
                      f"support it yet (tested: {TRANSFORMERS_RANGE})")


def _first_cache_kwarg() -> tuple[str, BaseException | None]:
    """The release's cache keyword, or the error importing transformers' Llama raised: a transformers that cannot
    import its own models (e.g. beside a ``kernels`` package newer than it knows) is refused in one line by
    :func:`check_transformers_version`, not a traceback at ``import msrnn``."""
    try:
        return _cache_kwarg(), None
    except CompatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure inside transformers
        return "cache", exc


CACHE_KWARG, _IMPORT_ERROR = _first_cache_kwarg()
_CACHE_NAMES = ("cache", "past_key_values")


_KWARG_BY_CLASS: dict[type, str] = {}


def cache_kwarg_for(model: Any) -> str:
    """The keyword ``model.forward`` takes its cache under (models migrate one by one between releases)."""
    cls = type(model)
    if cls not in _KWARG_BY_CLASS:
        params = _forward_params(cls.forward)
        names = [name for name in _CACHE_NAMES if name in params]
        _KWARG_BY_CLASS[cls] = names[0] if names else CACHE_KWARG
    return _KWARG_BY_CLASS[cls]


def cache_kwargs(cache: Any, model: Any = None) -> dict[str, Any]:
    """``{name: cache}`` under the keyword ``model``'s forward reads (this release's default without a model)."""
    return {cache_kwarg_for(model) if model is not None else CACHE_KWARG: cache}


def output_cache(out: Any) -> Any:
    """The cache a model output carries, whichever field name this release uses."""
    for name in _CACHE_NAMES:
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return value
    return None


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Pop the cache from a forward's ``**kwargs`` under either name (callers, ``generate`` and transformers'
    own heads use whichever their release knows); both at once is an error."""
    given = [value for value in (kwargs.pop(name, None) for name in _CACHE_NAMES) if value is not None]
    if len(given) > 1:
        raise MsrnnError("pass the cache once, as `cache` or as `past_key_values`, not both")
    return given[0] if given else None


def model_output(cls: type, **fields: Any) -> Any:
    """Build a transformers output dataclass, putting ``cache`` under the field name this release declares."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "cache" in fields and "cache" not in names:
        if "past_key_values" not in names:
            raise CompatError(f"{cls.__name__} has no cache field; msrnn cannot return its state through it")
        fields["past_key_values"] = fields.pop("cache")
    return cls(**fields)


def check_advanced(cache: Any, before: int, tokens: int, model_name: str) -> None:
    """Raise if a stateful forward did not advance ``cache`` by ``tokens`` (``before`` = tokens seen before).

    This is the run-time guard behind "never silently wrong": if a transformers release stops handing the
    cache to the layers (a renamed keyword, a new forward path), the state stays where it was and every later
    logit is computed without the past."""
    seen = cache.get_seq_length() if cache is not None else None
    if seen != before + tokens:
        raise CompatError(
            f"{model_name}: the state did not advance (saw {seen} tokens, expected {before + tokens}); the model "
            f"ignored the cache it was given, most likely because transformers {transformers.__version__} "
            f"changed how caches are passed (tested: {TRANSFORMERS_RANGE})")


# --------------------------------------------------------------------------- the audited contracts
def _attention_registry() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert callable(AttentionInterface.register) and callable(AttentionMaskInterface.register)
    assert callable(eager_mask) and callable(sdpa_mask)
    assert "sdpa" in ALL_ATTENTION_FUNCTIONS, "ALL_ATTENTION_FUNCTIONS has no 'sdpa'"


def _attention_call() -> None:
    # msrnn's attention functions are called as fn(module, query, key, value, attention_mask, scaling=..,
    # dropout=.., **kw) and return (out [B, T, H, D], weights).
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params = list(inspect.signature(sdpa_attention_forward).parameters)
    assert params[:5] == ["module", "query", "key", "value", "attention_mask"], params


def _cache_layers() -> None:
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

    assert "layers" in inspect.signature(Cache.__init__).parameters, "Cache(layers=...) is gone"
    for name in ("update", "get_seq_length", "get_mask_sizes", "lazy_initialization", "batch_select_indices",
                 "batch_repeat_interleave", "reset"):
        assert hasattr(DynamicLayer, name), f"DynamicLayer.{name} is gone"
    params = list(inspect.signature(DynamicLayer.get_mask_sizes).parameters)
    assert params[1:2] == ["query_length"], f"get_mask_sizes takes {params[1:]}, msrnn implements (query_length)"
    assert issubclass(DynamicLayer, CacheLayerMixin)


def _mask_sizes_called() -> None:
    # The mask builders must ask the cache layer how many columns it holds (EvictionLayer reports kept slots).
    from transformers import masking_utils

    src = inspect.getsource(masking_utils)
    assert "get_mask_sizes(" in src, "masking_utils no longer calls Cache.get_mask_sizes"


def _llama_layout() -> None:
    # SUPRA owns its decoder loop over Llama's modules: their names and call signatures must hold.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaModel(cfg)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        assert hasattr(model, name), f"LlamaModel.{name} is gone"
    layer = model.layers[0]
    assert isinstance(layer, LlamaDecoderLayer)
    for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
        assert hasattr(layer, name), f"LlamaDecoderLayer.{name} is gone"
    assert list(inspect.signature(model.rotary_emb.forward).parameters)[:2] == ["x", "position_ids"]


def _outputs() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    for cls in (BaseModelOutputWithPast, CausalLMOutputWithPast):
        names = {f.name for f in dataclasses.fields(cls)}
        assert names & set(_CACHE_NAMES), f"{cls.__name__} has no cache field"


def _tied_weights() -> None:
    # BST declares ties as {target: source}; transformers 5 reads that dict form.
    from transformers import PreTrainedModel

    src = inspect.getsource(PreTrainedModel)
    assert "_tied_weights_keys" in src


def _keep_in_fp32() -> None:
    # BST names its SSM kernels here so from_pretrained(dtype=bf16) loads them in fp32 (msrnn.ssm.fp32 refuses
    # a forward if they arrive in bf16 anyway, so a moved contract fails loudly either way).
    from transformers import PreTrainedModel

    assert hasattr(PreTrainedModel, "_keep_in_fp32_modules_strict"), "_keep_in_fp32_modules_strict is gone"
    assert "_keep_in_fp32_modules_strict" in inspect.getsource(PreTrainedModel._get_dtype_plan)


def _configs() -> None:
    from transformers import LlamaConfig, PretrainedConfig

    cfg = LlamaConfig(rope_theta=5000.0)
    params = getattr(cfg, "rope_parameters", None) or {}
    assert float(params.get("rope_theta", getattr(cfg, "rope_theta", 0))) == 5000.0, "rope_theta is not kept"
    assert hasattr(PretrainedConfig, "register_for_auto_class")


CONTRACTS: dict[str, Callable[[], None]] = {
    "forward cache keyword (cache / past_key_values)": _cache_kwarg,
    "attention-function and mask registries": _attention_registry,
    "attention-function call signature": _attention_call,
    "Cache(layers=...) and DynamicLayer methods, get_mask_sizes(query_length)": _cache_layers,
    "masking_utils asks cache layers for their mask sizes": _mask_sizes_called,
    "Llama module layout (SUPRA's owned decoder loop)": _llama_layout,
    "output dataclasses carry the cache": _outputs,
    "_tied_weights_keys": _tied_weights,
    "_keep_in_fp32_modules_strict (BST's SSM loads in fp32)": _keep_in_fp32,
    "config classes (rope_parameters, Auto registration)": _configs,
}


def check_contracts() -> None:
    """Run every contract check; raise one :class:`CompatError` naming all that fail."""
    failed = []
    for name, check in CONTRACTS.items():
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - any failure means the contract moved
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    if failed:
        raise CompatError(f"transformers {transformers.__version__} breaks msrnn's contracts: " + "; ".join(failed))
