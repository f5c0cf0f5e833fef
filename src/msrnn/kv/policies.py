"""Eviction policies: small dataclasses that only decide which slots to keep.

A policy turns the bookkeeping of a layer's candidate slots into one score per slot (higher = keep); the cache
keeps the ``budget`` best, in chronological order. Candidates arrive chronologically, so "recent" means "late
in the candidate axis". Padding slots always score ``-inf`` and go first.

* ``window``  -- Window: the last k tokens.
* ``sink``    -- Window+i / StreamingLLM (Xiao et al., 2023): the first ``sinks`` tokens plus the last k - sinks.
* ``h2o``     -- H2O (Zhang et al., 2023): a ``recent`` window plus heavy hitters by attention accumulated over
  every query since the token entered (not normalised by age, as in the official code). Per KV head by default
  (official: per head); ``per_head=False`` sums the heads of the layer.
* ``tova``    -- TOVA (Oren et al., 2024): keep the tokens the newest query attends to most, averaged over the
  layer's query heads, one selection per layer (official); ``per_head=True`` averages within each KV head's
  group instead. No token is protected by rule (the official code protects none; kvpress protects the newest).
* ``full``    -- no eviction (the reference).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from msrnn.errors import ConfigError
from msrnn.registry import Registry

# Protected slots get this bonus; scores that add it are float64 so BIG + index stays exact and never ties.
BIG = 1e12


@dataclass
class Candidates:
    """What a policy may look at, for the candidate slots of one layer (G = 1 or KV heads)."""

    positions: torch.Tensor  # [B, G, N] original token positions (-1 = padding)
    valid: torch.Tensor  # [B, G, N] bool
    acc: torch.Tensor | None  # [B, G, N] accumulated attention (H2O)
    last: torch.Tensor | None  # [B, G, N] newest query's attention, averaged over the group's query heads (TOVA)
    # [B, G, N] bool, or None when every slot is a candidate. The fast exact prefill scores all of a chunk's slots
    # and marks the current candidates here; rules about "the newest r" count members only.
    member: torch.Tensor | None = None


@dataclass
class Policy:
    """Base: ``budget`` slots per layer (and per KV head for per-head policies); None means unbounded."""

    budget: int | None
    name: ClassVar[str] = ""
    needs: ClassVar[str] = "none"  # "none" | "last" (newest query's attention row) | "all" (column sums)
    per_head: bool = False

    def __post_init__(self) -> None:
        if self.budget is not None and (not _is_int(self.budget) or self.budget < 1):
            raise ConfigError(f"budget must be an integer >= 1 slots, got {self.budget!r}; e.g. --budget 128")
        # Options are typed by their defaults: True is not a sink count and 1 is not a per-head switch.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, bool) and not isinstance(value, bool):
                raise ConfigError(f"{self.name} option {f.name} is true or false, got {value!r}")
            if _is_int(f.default) and not _is_int(value):
                raise ConfigError(f"{self.name} option {f.name} is an integer, got {value!r}")

    def score(self, c: Candidates) -> torch.Tensor:
        """Scores [B, G, N] of the candidate slots; the ``budget`` highest are kept (ties: the newer slot)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short label such as ``tova@64``."""
        return f"{self.name}@{self.budget}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _recency(c: Candidates) -> torch.Tensor:
    """Scores increasing with the original position: newer scores higher. (Positions, not slot indices: a fixed
    buffer's slots are not chronological. Padding, at -1, is masked out by the caller.)"""
    return c.positions.double()


def _newest(c: Candidates, r: int) -> torch.Tensor:
    """[B, G, N] bool: the ``r`` newest candidates by original position (members only, when marked)."""
    if r <= 0:
        return torch.zeros_like(c.valid)
    if c.member is None:
        if r >= c.positions.shape[-1]:
            return torch.ones_like(c.valid)
        return c.positions >= c.positions.topk(r, dim=-1).values[..., -1:]
    from_end = c.member.flip(-1).long().cumsum(-1).flip(-1)  # members at or after each slot
    return c.member & (from_end <= r)


@dataclass
class Full(Policy):
    """No eviction: the whole cache (the reference every policy is compared with)."""
    name: ClassVar[str] = "full"

    def score(self, c: Candidates) -> torch.Tensor:
        """Recency (never used to evict: the budget is unbounded)."""
        return _recency(c)


def _no_per_head(policy: Policy) -> None:
    if policy.per_head:
        raise ConfigError(f"{policy.name} keeps the same tokens for every head (by position), so per_head would change "
                          "nothing; drop it")


@dataclass
class Window(Policy):
    """Window: keep the last ``budget`` tokens."""
    name: ClassVar[str] = "window"

    def __post_init__(self) -> None:
        super().__post_init__()
        _no_per_head(self)

    def score(self, c: Candidates) -> torch.Tensor:
        """Recency: newer slots score higher."""
        return _recency(c)


@dataclass
class Sink(Policy):
    """Window+i (StreamingLLM, Xiao et al. 2023): the first ``sinks`` tokens plus the most recent ones."""
    sinks: int = 4
    name: ClassVar[str] = "sink"

    def __post_init__(self) -> None:
        super().__post_init__()
        _no_per_head(self)
        if self.sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {self.sinks}")
        if self.budget is not None and self.sinks >= self.budget:
            raise ConfigError(f"sinks ({self.sinks}) must be < budget ({self.budget}); lower --sinks or raise --budget")

    def score(self, c: Candidates) -> torch.Tensor:
        """Recency, with the sink tokens protected."""
        is_sink = (c.positions >= 0) & (c.positions < self.sinks)
        return _recency(c) + BIG * is_sink

    def describe(self) -> str:
        """A short label such as ``sink4@64``."""
        return f"sink{self.sinks}@{self.budget}"


@dataclass
class H2O(Policy):
    """H2O (Zhang et al. 2023): a recent window plus the heavy hitters by attention accumulated over all queries."""
    recent: int | None = None  # default budget // 2
    per_head: bool = True
    name: ClassVar[str] = "h2o"
    needs: ClassVar[str] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recent is None:
            self.recent = (self.budget or 2) // 2
        if not _is_int(self.recent):
            raise ConfigError(f"h2o option recent is an integer, got {self.recent!r}")
        if self.recent < 0:
            raise ConfigError(f"recent must be >= 0, got {self.recent}")
        if self.budget is not None and self.recent >= self.budget:
            raise ConfigError(f"recent ({self.recent}) must be < budget ({self.budget}); lower --recent")

    def score(self, c: Candidates) -> torch.Tensor:
        """Accumulated attention, with the ``recent`` newest slots protected."""
        return c.acc.double() + BIG * _newest(c, self.recent)

    def describe(self) -> str:
        """A short label such as ``h2o(r32,head)@64``."""
        return f"h2o(r{self.recent}{',head' if self.per_head else ',layer'})@{self.budget}"


@dataclass
class TOVA(Policy):
    """TOVA (Oren et al. 2024): keep the tokens the newest query attends to most, averaged over query heads."""
    keep_newest: bool = False  # variant: always keep the newest token (kvpress's deviation from the official code)
    sinks: int = 0  # variant: always keep the first `sinks` tokens
    name: ClassVar[str] = "tova"
    needs: ClassVar[str] = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ConfigError(f"sinks must be >= 0, got {self.sinks}")
        if self.budget is not None and self.sinks + self.keep_newest >= self.budget:
            raise ConfigError(f"sinks ({self.sinks}) plus the newest token must be < budget ({self.budget})")

    def score(self, c: Candidates) -> torch.Tensor:
        """The newest query's attention probabilities (with the optional sink/newest protections)."""
        if not (self.keep_newest or self.sinks):
            return c.last  # attention probabilities; fp32 suffices (no BIG offsets to keep exact)
        protected = (c.positions >= 0) & (c.positions < self.sinks)
        if self.keep_newest:
            protected = protected | _newest(c, 1)
        return c.last.double() + BIG * protected

    def describe(self) -> str:
        """A short label such as ``tova@64``."""
        opts = [o for o, on in (("head", self.per_head), ("newest", self.keep_newest), (f"sink{self.sinks}",
                                                                                          self.sinks)) if on]
        return f"tova{'(' + ','.join(opts) + ')' if opts else ''}@{self.budget}"


KV_POLICIES: Registry[type[Policy]] = Registry("KV policy")
for _cls, _help in [
    (Full, "no eviction: the full KV cache (reference)"),
    (Window, "Window: keep the last k tokens"),
    (Sink, "Window+i / StreamingLLM: the first `sinks` tokens plus the last k - sinks"),
    (H2O, "H2O: recent window + heavy hitters by accumulated attention"),
    (TOVA, "TOVA: keep the tokens the newest query attends to most"),
]:
    KV_POLICIES.add(_cls.name, _cls, _help)


def make_policy(name: str, budget: int | None, **options) -> Policy:
    """Build a registered policy; options that the policy does not take are ignored only if None."""
    cls = KV_POLICIES.get(name)
    fields = set(cls.__dataclass_fields__)
    unknown = [k for k, v in options.items() if v is not None and k not in fields]
    if unknown:
        raise ConfigError(f"policy {name!r} takes no option {', '.join(unknown)}; remove it")
    kwargs = {k: v for k, v in options.items() if v is not None and k in fields}
    if name == "full":
        if budget is not None:
            raise ConfigError(f"policy 'full' keeps every slot, so a budget ({budget}) would be ignored; drop it")
    elif budget is None:
        raise ConfigError(f"policy {name!r} needs a budget; pass --budget K (slots per layer)")
    return cls(budget=budget, **kwargs)
