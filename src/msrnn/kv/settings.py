"""One record of everything that bounds a model's KV cache, and the one function that applies it.

Every command and study builds a :class:`KVSettings` once (from CLI flags, a ``tova:per_head=true`` spec, or code)
and calls :func:`apply_kv`; nothing else turns flags into a policy, so a flag cannot be accepted in one place and
dropped in another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from msrnn.errors import ConfigError
from msrnn.families import Knobs
from msrnn.kv.cache import check_options
from msrnn.kv.policies import KV_POLICIES, Policy, make_policy

OPTION_NAMES = ("sinks", "recent", "per_head", "keep_newest")


@dataclass(frozen=True)
class KVSettings(Knobs):
    """KV eviction's knobs (``msrnn.kv.family.KVSpec``): a policy (registry name), its budget in slots per layer,
    the policy's options (None = its default), and how the cache prefills chunks and positions keys."""

    policy: str
    budget: int | None = None
    sinks: int | None = None
    recent: int | None = None
    per_head: bool | None = None
    keep_newest: bool | None = None
    prefill: str = "exact"
    positions: str = "original"
    storage: str = "naive"
    compile: bool = False  # torch.compile the in-place decode step (fixed storage)

    SIZE_FIELDS = ("budget",)

    def __post_init__(self) -> None:
        # Every option is checked now, not at the first chunk, by the same checks the cache and engine run.
        check_options(self.make_policy(), self.prefill, self.positions, self.storage, self.compile)

    def options(self) -> dict[str, Any]:
        """The policy options that were given (None means the policy's default)."""
        return {k: v for k, v in asdict(self).items() if k in OPTION_NAMES}

    def make_policy(self) -> Policy:
        """The :class:`~msrnn.kv.Policy` these settings name."""
        return make_policy(self.policy, self.budget, **self.options())

    @classmethod
    def from_spec(cls, spec: str, budget: int | None = None, **kwargs: Any) -> KVSettings:
        """``tova`` / ``h2o:per_head=false,recent=16`` / ``sink:sinks=1`` (the ``kv sweep --policies`` syntax)."""
        name, opts = parse_policy_spec(spec)
        return cls(name, budget, **opts, **kwargs)


def settings_or_none(policy: str | None, flag: str = "policy", **options: Any) -> KVSettings | None:
    """The :class:`KVSettings` for ``policy`` and ``options``; None when no policy is named, refusing any option
    given without one (``flag`` names the policy argument in the error: ``--policy`` or ``policy``)."""
    if policy:
        return KVSettings(policy, **options)
    defaults = {f.name: f.default for f in fields(KVSettings)}
    given = [name for name, value in options.items() if value != defaults[name]]
    if given:
        raise ConfigError(f"KV options ({', '.join(given)}) need {flag} (window, sink, h2o or tova)")
    return None


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``h2o:per_head=false,recent=16`` -> ("h2o", {"per_head": False, "recent": 16}); names and keys checked."""
    name, _, rest = spec.partition(":")
    KV_POLICIES.get(name)
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"bad policy option {item!r} in {spec!r}; write key=value, e.g. h2o:per_head=false")
        if key not in OPTION_NAMES:
            raise ConfigError(f"policy {name!r} takes no option {key}; use {', '.join(OPTION_NAMES)}")
        low = value.lower()
        try:
            opts[key] = True if low == "true" else False if low == "false" else int(value)
        except ValueError:
            raise ConfigError(f"bad value {value!r} for {key} in {spec!r}; use true, false or an integer") from None
    return name, opts


def apply_kv(lm: Any, settings: KVSettings) -> Any:
    """Bound an already-loaded :class:`~msrnn.models.HFCausalLM` (its model and tokenizer) by ``settings``."""
    from msrnn.kv.lm import KVEvictionLM
    from msrnn.models.hf import HFCausalLM

    if type(lm) is not HFCausalLM:  # a SUPRA model is an HFCausalLM too, but has no KV cache to bound
        raise ConfigError(f"KV eviction applies to plain HF causal LMs (family 'hf'), not to {type(lm).__name__}")
    return KVEvictionLM(lm.model, settings.make_policy(), settings.prefill, settings.positions,
                        tokenizer=lm.tokenizer, storage=settings.storage, compile=settings.compile)
