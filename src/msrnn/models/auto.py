"""Registering msrnn's own config/model classes with transformers' Auto classes (save/load by model_type)."""

from __future__ import annotations

from typing import Any


def register_auto(model_type: str, config_cls: type, model_cls: type, auto: str = "AutoModelForCausalLM") -> None:
    """``AutoConfig`` + ``auto`` registration, idempotent (a module may be imported more than once)."""
    import transformers

    from msrnn.compat import check_transformers_version

    check_transformers_version()  # every family registers at import: an untested release is refused here
    try:
        transformers.AutoConfig.register(model_type, config_cls)
    except ValueError:
        return  # already registered
    auto_cls: Any = getattr(transformers, auto)
    auto_cls.register(config_cls, model_cls)
