"""Build SUPRA, BST and RMT models from one base decoder, each sized to a state budget in bytes, with equal
training tokens: what ``msrnn compare --build`` uses to put the four families at equal state bytes.

Sizing (each family's knob, chosen so the *measured* peak state, at any offset inside a block or segment, fits):

* ``supra``: phi's width F per head (state [H, F, head_dim] fp32 per layer); F is the largest even width that fits.
* ``bst``: BST:SH (or the variant ``BuildConfig.knobs["bst"]`` names) started from the base weights
  (``msrnn.bst.from_llama``); the block
  size W (a multiple of 8) and the SSM state size N. The state is every layer's block keys/values plus the SSM
  layer's state and context keys, so W takes what N leaves.
* ``rmt``: the segment length S and memory size m. The state is the memory plus the current segment's keys and
  values (m read slots + up to S - 1 tokens), so S takes what m leaves; m is the largest of 16/8/4/2 that still
  leaves a segment of at least 4m tokens.
* ``kv`` (fitted, not built: a policy applied to the base model): as many slots per layer as the keys, values and
  the policy's bookkeeping fit, measured inside prefill chunks too.

Each family's spec (``msrnn.families``) answers every family-specific question here; :func:`fit` is the one
fit-to-bytes routine. Every model starts from the base model's weights and trains on the same data for the same
number of tokens (``BuildConfig.train_tokens``, rounded up to whole steps: RMT's sequences are whole segments), so
differences reflect the method and its state, not unequal training. The models are cached under
``<cache>/models/built/`` by a hash of the base model, the sizing and the build config: a second run, or a second
compare at the same budget, reuses them; an interrupted build resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msrnn.errors import ConfigError
from msrnn.families import FAMILIES, FamilySpec, Knobs, build_families


@dataclass
class BuildConfig:
    """How ``build`` trains every family at a state budget: tokens, sequence length, lr, and each family's
    options (``knobs``: family -> knob values that are not sized, e.g. ``{"bst": {"variant": "mh"}}``)."""
    families: tuple[str, ...] = ()  # () = every family a build can make
    train_tokens: int = 262_144  # per model, the same for every family and budget
    seq_len: int = 512
    batch_size: int = 4
    lr: float = 1e-3
    knobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: str = "stdlib"
    seed: int = 0

    def __post_init__(self) -> None:
        self.families = tuple(self.families) or build_families()
        bad = [f for f in self.families if f not in build_families()]
        if bad:
            raise ConfigError(f"cannot build {', '.join(bad)}; --build takes {', '.join(build_families())}")
        if self.train_tokens < self.seq_len * self.batch_size:
            raise ConfigError(f"train_tokens {self.train_tokens} is less than one batch ({self.batch_size} x "
                              f"{self.seq_len}); give at least {self.seq_len * self.batch_size}")
        if self.seq_len < 64:
            raise ConfigError(f"seq_len must be >= 64 for building, got {self.seq_len}")
        for family in self.knobs:
            if family not in build_families():
                raise ConfigError(f"knobs for {family!r}, which a build does not make; give "
                                  f"{', '.join(build_families())}")
            self.options(family)  # each family's own knob validation, now

    def options(self, family: str) -> Knobs:
        """``family``'s knobs before sizing: its defaults and the options this config sets."""
        return FAMILIES.get(family).knobs(**self.knobs.get(family, {}))


def _buildable(family: str) -> FamilySpec:
    if family not in build_families():
        raise ConfigError(f"cannot build {family!r}; use one of {', '.join(build_families())}")
    return FAMILIES.get(family)


def size_for_state_bytes(family: str, base_config: Any, state_bytes: int, options: Knobs | None = None
                         ) -> Knobs | None:
    """The family's knobs whose state fits ``state_bytes`` by the cost model (which tests tie to the
    implementations), from ``options`` (default: its defaults); None when no sensible size fits."""
    from msrnn.bench.costs import Arch

    spec = FAMILIES.get(family)
    return spec.size_for_state_bytes(Arch.from_config(base_config), state_bytes, options or spec.knobs())


def build_key(base: str | Path, family: str, sizing: dict[str, int], cfg: BuildConfig) -> str:
    """Names a built model: base model (path and its msrnn.json), family, sizing and build settings."""
    base = Path(base)
    meta = (base / "msrnn.json").read_text() if (base / "msrnn.json").exists() else ""
    blob = json.dumps({"base": str(base.resolve()), "meta": meta, "family": family, "sizing": sizing,
                       "cfg": {k: v for k, v in asdict(cfg).items() if k != "families"}}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def check_state_bytes(state_bytes: int) -> None:
    """A state budget is a positive number of bytes; anything else is an error, not "does not fit"."""
    if isinstance(state_bytes, bool) or not isinstance(state_bytes, int) or state_bytes < 1:
        raise ConfigError(f"a state budget is a positive number of bytes, got {state_bytes!r}; e.g. 262144 (256 KiB)")


def fit(family: str, base_model: Any, state_bytes: int, options: Knobs | None = None, seed: int = 0
        ) -> tuple[Knobs | None, int]:
    """(knobs, measured peak state bytes) of ``family`` on the plain decoder ``base_model``: the cost model's size,
    shrunk until the untrained model's *measured* state fits ``state_bytes`` (the spec's probe: every offset of a
    block or segment, and what a KV prefill holds inside a chunk). The one fit-to-bytes routine for every family,
    KV eviction included; ``(None, 0)`` when nothing sensible fits."""
    from msrnn.protocol import measure_state_bytes

    check_state_bytes(state_bytes)
    spec = FAMILIES.get(family)
    knobs = size_for_state_bytes(family, base_model.config, state_bytes, options)
    while knobs is not None:
        tokens, chunk = spec.probe(knobs)
        nbytes = measure_state_bytes(spec.untrained_lm(base_model, knobs, seed), tokens=tokens, chunk=chunk)
        if nbytes <= state_bytes:
            return knobs, nbytes
        knobs = spec.shrink(knobs)
    return None, 0


def make_model(family: str, base_model: Any, knobs: Knobs, cfg: BuildConfig) -> Any:
    """The untrained model of ``family`` at ``knobs``, holding (a copy of) the base model's weights."""
    import copy

    return _buildable(family).make(copy.deepcopy(base_model), knobs, seed=cfg.seed)


def build(family: str, base: str | Path, state_bytes: int, cfg: BuildConfig, root: str | Path | None = None,
          progress: bool = True) -> tuple[Path | None, dict[str, int] | None]:
    """Train (or reuse) ``family`` sized to ``state_bytes`` from ``base``; returns (model dir, sizing), or
    (None, None) when the family cannot fit the budget."""
    from msrnn.io import cache_dir
    from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for
    from msrnn.train import TrainConfig
    from msrnn.train.pretrain import PretrainConfig, train_lm

    check_state_bytes(state_bytes)
    spec = _buildable(family)
    base_model = load_hf_causal_lm(base)
    knobs, _ = fit(family, base_model, state_bytes, cfg.options(family), seed=cfg.seed)
    if knobs is None:
        return None, None
    sizing = knobs.sizing()
    root = Path(root) if root else cache_dir() / "models" / "built"
    out = root / f"{Path(base).name}-{family}-{state_bytes}-{build_key(base, family, sizing, cfg)}"
    if (out / "msrnn.json").exists():  # written last by the trainer's export: the model is complete
        return out, sizing
    model = make_model(family, base_model, knobs, cfg)
    seq_len = spec.train_seq_len(cfg.seq_len, knobs)  # RMT: whole segments per training sequence
    steps = -(-cfg.train_tokens // (seq_len * cfg.batch_size))  # train_tokens rounded up to whole steps
    train_lm(model, load_tokenizer_for(base), PretrainConfig(preset=None, data=cfg.data, seq_len=seq_len,
                                                             batch_size=cfg.batch_size, val_batches=2),
             TrainConfig(max_steps=steps, lr=cfg.lr, warmup_steps=max(1, steps // 10), eval_every=0, seed=cfg.seed),
             out, {"family": family, "built_from": str(base), "budget_bytes": state_bytes, "sizing": sizing,
                   "build": asdict(cfg)}, resume=True, progress=progress)
    return out, sizing


def build_task(family: str, source: str | Path, tune: Any, root: str | Path | None = None,
               progress: bool = True) -> Path:
    """``source`` (a base model for the KV family, or a built model) fine-tuned on ``tune.task`` with
    ``msrnn.train.tasks`` (the same samples and steps for every family); cached next to built models."""
    from msrnn.io import cache_dir
    from msrnn.models.loading import load_tokenizer_for, read_meta
    from msrnn.train.tasks import task_tune

    spec = FAMILIES.get(family)
    source = Path(source)
    root = Path(root) if root else cache_dir() / "models" / "built"
    blob = json.dumps({"source": str(source.resolve()), "meta": read_meta(source), "tune": asdict(tune)},
                      sort_keys=True, default=str)
    out = root / f"{source.name}-{tune.task}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"
    if (out / "msrnn.json").exists():
        return out
    model = spec.load_trainable(source).train()
    meta = {k: v for k, v in read_meta(source).items() if k not in ("step", "task", "task_tune", "task_val_acc")}
    task_tune(model, load_tokenizer_for(source), tune, out,
              {**meta, "family": spec.tuned_family or spec.name, "tuned_from": str(source)}, spec=spec,
              progress=progress)
    return out
