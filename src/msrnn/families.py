"""One record per model family: everything the spine needs to know about a family, in one registry.

A record names, by dotted path (imported only when used, so this module imports no family), the family's loader
(``spec -> StatefulLM``), the modules that register its transformers classes, the ``model_type`` values it saves,
and its ``family.py`` hooks module: ``cost(arch, length, **knobs)`` for the analytic cost model and, for families a
build can size to a byte budget, ``size_for_budget``, ``make``, ``as_lm``, ``load_trainable`` and ``SHRINK``.
Loading (``models.loading``), building (``build``) and the cost model (``bench.costs``) read these records instead
of branching on family names, so adding a family touches its own folder and one line below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from msrnn.registry import Registry


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    """A model family's record: where its loader, classes and hooks live (imported when used)."""
    name: str
    help: str
    loader: str | None  # "module:function"; None for a family applied to another one's models (kv)
    hooks: str  # the family.py module: cost model and build hooks
    model_types: tuple[str, ...] = ()  # config model_type values this family saves
    modeling: tuple[str, ...] = ()  # modules whose import registers the family's classes with transformers
    buildable: bool = False  # a build can size it to a state budget from a base decoder
    cost_label: str = ""  # its name in the cost table (the full cache is "full"), default the family name

    def load(self, *args: Any, **kwargs: Any) -> Any:
        """Load a model directory of this family as a StatefulLM."""
        return _resolve(self.loader)(*args, **kwargs)

    def module(self) -> ModuleType:
        """The family's hooks module (``family.py``)."""
        return importlib.import_module(self.hooks)


FAMILIES: Registry[Family] = Registry("model family")
for _f in (
    Family("hf", "any Hugging Face causal LM with its full KV cache", "msrnn.models.loading:load_full",
           "msrnn.models.family", cost_label="full"),
    Family("kv", "KV eviction on an HF model (Window, Window+i, H2O, TOVA)", None, "msrnn.kv.family"),
    Family("supra", "SUPRA linear-attention RNN (constant state)", "msrnn.supra.lm:load_supra", "msrnn.supra.family",
           ("msrnn_supra",), ("msrnn.supra.modeling",), buildable=True),
    Family("bst", "Block-State Transformer (SSM + block attention)", "msrnn.bst.lm:load_bst", "msrnn.bst.family",
           ("msrnn_bst",), ("msrnn.bst.modeling",), buildable=True),
    Family("rmt", "Recurrent Memory Transformer (memory tokens)", "msrnn.rmt.lm:load_rmt", "msrnn.rmt.family",
           ("msrnn_rmt", "msrnn_rmt_encoder"), ("msrnn.rmt.wrapper", "msrnn.rmt.encoder"), buildable=True),
):
    FAMILIES.add(_f.name, _f, _f.help)

# The cost table's and the build's families, in registration order.
COST_FAMILIES = tuple(f.cost_label or f.name for f in FAMILIES.values())
BUILD_FAMILIES = tuple(f.name for f in FAMILIES.values() if f.buildable)


def by_cost_label(label: str) -> Family:
    """The family whose cost-table name is ``label`` (``full`` is the ``hf`` family)."""
    return next(f for f in FAMILIES.values() if (f.cost_label or f.name) == label)


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family that saves configs of ``model_type``, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def modeling_modules() -> dict[str, str]:
    """model_type -> the module whose import registers it with transformers."""
    return {t: m for f in FAMILIES.values() for t, m in zip(f.model_types, f.modeling, strict=True)}
