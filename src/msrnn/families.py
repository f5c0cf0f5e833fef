"""One typed spec per model family, in one registry: everything outside a family asks its spec.

A :class:`FamilySpec` owns its family's typed knobs (a frozen dataclass validated in ``__post_init__``) and every
method a caller needs: the analytic ``cost`` model, ``size_for_state_bytes`` (the knobs whose state fits a byte
budget), ``make``/``as_lm``/``load``/``load_trainable`` for built and saved models, ``apply`` for a family bound
onto an already-loaded plain decoder (KV eviction, or RMT memory around an untrained base), and the small
questions the spine used to answer by branching on a family name (how a built model is probed, which task an
RMT was trained on, how a task's final answer is scored, how the comparison report draws it).

Naming: a KV *budget* is slots per layer; wherever bytes are meant the name is ``state_bytes``.

The registry lists each spec by dotted path and imports it on first use, so importing this module imports no
family. Adding a family: write ``<family>/family.py`` with a spec (see the README's layout section) and add one
row to ``_ROWS`` below.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from msrnn.errors import ConfigError

# Figures a spec's ``cost`` returns: forward FLOPs for a whole stream and the state bytes held after it.
Cost = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Base of a family's typed knobs: its size (what a build fits to a byte budget) and its options."""

    SIZE_FIELDS: ClassVar[tuple[str, ...]] = ()  # the knobs a saved model's config records as its size

    def sizing(self) -> dict[str, int]:
        """The size knobs as a dict (what a built model's ``msrnn.json`` and a comparison entry record)."""
        return {name: getattr(self, name) for name in self.SIZE_FIELDS}

    def replace(self, **changes: Any) -> Knobs:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def require_ints(self, family: str, names: tuple[str, ...], minimum: int = 1) -> None:
        """Refuse a knob among ``names`` that is not an integer >= ``minimum`` (None is left to the caller)."""
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"{family} {name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class NoKnobs(Knobs):
    """A family with nothing to set (the full cache)."""


class FamilySpec:
    """A model family: its name, saved model types, typed knobs and the methods every caller needs.

    Subclasses set the class attributes and override what their family supports; the defaults refuse with the
    family's name, so a caller never has to check what a family is before asking it."""

    name: ClassVar[str]
    label: ClassVar[str] = ""  # its name in cost tables and comparison entries (the full cache is "full")
    help: ClassVar[str] = ""
    knobs_type: ClassVar[type[Knobs]] = NoKnobs
    loadable: ClassVar[bool] = False  # a model folder of this family loads as a StatefulLM (``load``)
    applies: ClassVar[bool] = False  # ``apply`` binds it onto a loaded plain decoder (KV; RMT around an untrained base)
    trainable: ClassVar[bool] = False  # a build can make it from a base decoder, size it and train it
    tuned_family: ClassVar[str] = ""  # the family of a model fine-tuned from this one's (KV tunes a plain model)
    shrink_step: ClassVar[tuple[str, int, int] | None] = None  # (knob, step, floor) when the measured state is over
    self_check: ClassVar[dict[str, Any] | None] = None  # knobs msrnn.models.selfcheck builds a tiny model at
    marker: ClassVar[str] = "x"  # its marker in the comparison report's plots
    reference: ClassVar[bool] = False  # the unbounded reference (drawn black)

    @property
    def model_types(self) -> tuple[str, ...]:
        """The config ``model_type`` values this family saves (its registry row: known before it is imported)."""
        return FAMILIES.row(self.name).model_types

    @property
    def modeling(self) -> tuple[str, ...]:
        """The modules whose import registers those types with transformers."""
        return FAMILIES.row(self.name).modeling

    @property
    def cost_label(self) -> str:
        """The family's name in cost tables and comparison entries."""
        return self.label or self.name

    # knobs
    def knobs(self, **values: Any) -> Knobs:
        """This family's typed knobs from ``values``; a name that is not one of them is refused, naming them."""
        names = self.knob_names()
        bad = sorted(set(values) - set(names))
        if bad:
            raise ConfigError(f"the {self.name} family has no knob {', '.join(bad)}; its knobs are "
                              f"{', '.join(names) or 'none'}")
        return self.knobs_type(**values)

    def knob_names(self) -> tuple[str, ...]:
        """The names of this family's knobs."""
        return tuple(f.name for f in dataclasses.fields(self.knobs_type))

    # cost model and sizing
    def cost(self, arch: Any, length: int, knobs: Knobs) -> Cost:
        """Forward FLOPs of a ``length``-token stream and the state bytes after it (``msrnn.bench.costs``)."""
        raise NotImplementedError(self.name)

    def size_for_state_bytes(self, arch: Any, state_bytes: int, knobs: Knobs) -> Knobs | None:
        """``knobs`` resized so the cost model's state fits ``state_bytes``; None when no sensible size fits."""
        raise ConfigError(f"the {self.name} family cannot be sized to a byte budget")

    def shrink(self, knobs: Knobs) -> Knobs | None:
        """One step smaller, for when the measured state is over budget; None below the floor."""
        if self.shrink_step is None:
            return None
        knob, step, floor = self.shrink_step
        smaller = getattr(knobs, knob) - step
        return knobs.replace(**{knob: smaller}) if smaller >= floor else None

    def probe(self, knobs: Knobs) -> tuple[int, int]:
        """(tokens, chunk) of the random stream whose peak state a fit measures: long enough to cross the
        family's blocks or segments at every offset."""
        return 64, 1

    # models
    def make(self, base_model: Any, knobs: Knobs, seed: int = 0) -> Any:
        """The untrained trainable module at ``knobs``, holding ``base_model``'s weights (it may reuse them)."""
        raise ConfigError(f"the {self.name} family is not built from a base decoder")

    def as_lm(self, model: Any) -> Any:
        """A module ``make`` or ``load_trainable`` returned, as a StatefulLM."""
        raise ConfigError(f"the {self.name} family has no trainable module")

    def untrained_lm(self, base_model: Any, knobs: Knobs, seed: int = 0) -> Any:
        """The StatefulLM at ``knobs`` from a plain decoder module (what a fit measures); ``base_model`` is
        left as it was."""
        return self.as_lm(self.make(copy.deepcopy(base_model), knobs, seed).eval())

    def apply(self, lm: Any, knobs: Knobs) -> Any:
        """Bound an already-loaded plain decoder (a :class:`~msrnn.models.HFCausalLM`) by this family."""
        raise ConfigError(f"the {self.name} family is loaded from its own model folder, not applied to a plain "
                          "decoder")

    def load(self, path: str | Path, **options: Any) -> Any:
        """A saved model folder of this family as a StatefulLM."""
        raise ConfigError(f"the {self.name} family is applied to a loaded model, not loaded from a folder")

    def load_trainable(self, path: Path) -> Any:
        """A saved model of this family as a trainable module (for task fine-tuning)."""
        raise ConfigError(f"the {self.name} family has no trainable module to load")

    def train_seq_len(self, seq_len: int, knobs: Knobs) -> int:
        """The training sequence length a build uses for ``seq_len`` (RMT: whole segments)."""
        return seq_len

    # tasks
    def final_logits(self, model: Any, input_ids: Any, attention_mask: Any = None) -> Any:
        """Next-token logits at the last position [B, V] of a trainable module (task training and scoring). A plain
        decoder reads one length per batch: padding would shift its positions, so it is refused."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ConfigError(f"the {self.name} family trains on tasks one length per batch (padding would shift "
                              "positions); use the step schedule (task_tune)")
        return model(input_ids=input_ids)["logits"][:, -1]

    def task_head(self, model: Any) -> str:
        """How a trainable module answers a task: ``lm`` (the label's first token after the question) or
        ``classifier`` (its own head and loss)."""
        return "lm"

    def record_task(self, model: Any, task: str, labels: list[str]) -> None:
        """Record the task in the model's own config where the family saves one (RMT); nothing otherwise."""

    def answers_itself(self, lm: Any) -> bool:
        """Whether a task's answer is scored by the model's own ``final_logits`` instead of by streaming (RMT
        aligns its segments to the end of a sample, as it was trained)."""
        return False

    def trained_task(self, lm: Any) -> tuple[str | None, int | None]:
        """(task, segment length) the model's own config records, for a family that saves them."""
        return None, None

    def chunk_invariant(self, lm: Any) -> bool:
        """Whether feeding a stream in other chunks gives the same function (the protocol's promise), so a read
        state may be shared: true for every family except KV eviction that evicts once per chunk or group."""
        return True

    def retention(self, lm: Any, state: Any, positions: list[int]) -> list[float] | None:
        """Per layer, the share of the tokens at original ``positions`` the state still holds (for a family whose
        state keeps tokens: KV eviction); None for a family whose state does not keep tokens."""
        return None

    # the comparison report
    def series(self, entry: dict[str, Any]) -> str | None:
        """The line a comparison entry belongs to across budgets (None: a single point)."""
        return f"{self.name} (built)" if entry.get("sizing") else None

    def shown(self, entry: dict[str, Any]) -> bool:
        """Whether the per-position and speed plots draw this entry (they would be crowded by every policy)."""
        return True


@dataclasses.dataclass(frozen=True)
class Row:
    """What must be known of a family before it is imported: where its spec is, its help, the model types it
    saves and the modules that register them (model loading maps a folder's model_type to them)."""

    spec: str  # "module:Class"
    help: str
    model_types: tuple[str, ...] = ()
    modeling: tuple[str, ...] = ()


_ROWS: dict[str, Row] = {
    "hf": Row("msrnn.models.family:FullSpec", "any Hugging Face causal LM with its full KV cache"),
    "kv": Row("msrnn.kv.family:KVSpec", "KV eviction on an HF model (Window, Window+i, H2O, TOVA)"),
    "supra": Row("msrnn.supra.family:SupraSpec", "SUPRA linear-attention RNN (constant state)", ("msrnn_supra",),
                 ("msrnn.supra.modeling",)),
    "bst": Row("msrnn.bst.family:BSTSpec", "Block-State Transformer (SSM + block attention)", ("msrnn_bst",),
               ("msrnn.bst.modeling",)),
    "rmt": Row("msrnn.rmt.family:RMTSpec", "Recurrent Memory Transformer (memory tokens)",
               ("msrnn_rmt", "msrnn_rmt_encoder"), ("msrnn.rmt.wrapper", "msrnn.rmt.encoder")),
}


class FamilyRegistry:
    """The family specs by name (their cost labels are accepted too: ``full`` is ``hf``), built on first use."""

    kind = "model family"

    def __init__(self, rows: dict[str, Row]) -> None:
        self._paths = rows
        self._built: dict[str, FamilySpec] = {}

    def row(self, name: str) -> Row:
        """The registry row of family ``name`` (imports nothing)."""
        return self._paths[name]

    def get(self, name: str) -> FamilySpec:
        """The spec named ``name`` (or whose cost label it is), or a ConfigError listing the families."""
        if name not in self._paths:  # a cost label (building every spec to read theirs)
            name = {self.get(n).cost_label: n for n in self._paths}.get(name, name) if isinstance(name, str) else name
        if name not in self._paths:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._paths))}")
        if name not in self._built:
            module, _, cls = self._paths[name].spec.partition(":")
            spec = getattr(importlib.import_module(module), cls)()
            if spec.name != name:
                raise RuntimeError(f"{self._paths[name].spec} names itself {spec.name!r}, registered as {name!r}")
            self._built[name] = spec
        return self._built[name]

    def describe(self, name: str) -> str:
        """The one-line help of ``name``, without importing it."""
        return self._paths[name].help

    def names(self) -> list[str]:
        """Every family name, sorted."""
        return sorted(self._paths)

    def values(self) -> list[FamilySpec]:
        """Every spec, in registration order."""
        return [self.get(n) for n in self._paths]

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


FAMILIES = FamilyRegistry(_ROWS)


def family_spec(name: str) -> FamilySpec:
    """The spec of family ``name`` (or cost label: ``full``)."""
    return FAMILIES.get(name)


def cost_families() -> tuple[str, ...]:
    """The cost table's families, by their cost labels, in registration order."""
    return tuple(f.cost_label for f in FAMILIES.values())


def build_families() -> tuple[str, ...]:
    """The families a build can size and train from a base decoder."""
    return tuple(f.name for f in FAMILIES.values() if f.trainable)


def lm_family(lm: Any) -> FamilySpec:
    """The spec of a StatefulLM: its ``family`` attribute names it (an adapter outside msrnn that names none is
    driven as a plain streaming model)."""
    return FAMILIES.get(getattr(lm, "family", "hf"))


def family_of_model_type(model_type: str | None) -> FamilySpec | None:
    """The family that saves configs of ``model_type``, or None (imports only that family)."""
    name = next((n for n in FAMILIES.names() if model_type in FAMILIES.row(n).model_types), None)
    return FAMILIES.get(name) if name else None


def modeling_modules() -> dict[str, str]:
    """model_type -> the module whose import registers it with transformers (imports nothing)."""
    return {t: m for n in FAMILIES.names()
            for t, m in zip(FAMILIES.row(n).model_types, FAMILIES.row(n).modeling, strict=True)}
