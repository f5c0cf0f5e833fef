"""Registering msrnn's own config/model classes with transformers' Auto classes (save/load by model_type)."""

from __future__ import annotations

from typing import Any


def register_auto(model_type: str, config_cls: type, model_cls: type,
                  auto: str | tuple[str, ...] = "AutoModelForCausalLM") -> None:
    """``AutoConfig`` + ``auto`` registration (one Auto class or several), idempotent (a module may be imported
    more than once). ``import msrnn`` imports every module that calls this (``msrnn.register_models``)."""
    import transformers

    from msrnn.compat import check_transformers_version

    check_transformers_version()  # every family registers at import: an untested release is refused here
    try:
        transformers.AutoConfig.register(model_type, config_cls)
    except ValueError:
        return  # already registered
    for name in (auto,) if isinstance(auto, str) else auto:
        auto_cls: Any = getattr(transformers, name)
        auto_cls.register(config_cls, model_cls)
