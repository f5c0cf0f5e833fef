"""Build SUPRA, BST and RMT models from one base decoder, each sized to a state budget in bytes, with equal
training tokens: what ``msrnn compare --build`` uses to put the four families at equal state bytes.

Sizing (each family's knob, chosen so the *measured* peak state, at any offset inside a block or segment, fits):

* ``supra``: phi's width F per head (state [H, F, head_dim] fp32 per layer); F is the largest even width that fits.
* ``bst``: BST:SH (or the configured variant) started from the base weights (``msrnn.bst.from_llama``); the block
  size W (a multiple of 8) and the SSM state size N. The state is every layer's block keys/values plus the SSM
  layer's state and context keys, so W takes what N leaves.
* ``rmt``: the segment length S and memory size m. The state is the memory plus the current segment's keys and
  values (m read slots + up to S - 1 tokens), so S takes what m leaves; m is the largest of 16/8/4/2 that still
  leaves a segment of at least 4m tokens.

Every model starts from the base model's weights and trains on the same data for the same number of tokens
(``BuildConfig.train_tokens``, rounded up to whole steps: RMT's sequences are whole segments), so differences
reflect the method and its state, not unequal training. The
models are cached under ``<cache>/models/built/`` by a hash of the base model, the sizing and the build config:
a second run, or a second compare at the same budget, reuses them; an interrupted build resumes from its
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from msrnn.errors import ConfigError
from msrnn.families import BUILD_FAMILIES, FAMILIES


@dataclass
class BuildConfig:
    """How ``build`` trains every family at a budget: tokens, sequence length, lr, variant."""
    families: tuple[str, ...] = BUILD_FAMILIES
    train_tokens: int = 262_144  # per model, the same for every family and budget
    seq_len: int = 512
    batch_size: int = 4
    lr: float = 1e-3
    bst_variant: str = "sh"
    data: str = "stdlib"
    seed: int = 0

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        bad = [f for f in self.families if f not in BUILD_FAMILIES]
        if bad:
            raise ConfigError(f"cannot build {', '.join(bad)}; --build takes {', '.join(BUILD_FAMILIES)}")
        if self.train_tokens < self.seq_len * self.batch_size:
            raise ConfigError(f"train_tokens {self.train_tokens} is less than one batch ({self.batch_size} x "
                              f"{self.seq_len}); give at least {self.seq_len * self.batch_size}")
        if self.seq_len < 64:
            raise ConfigError(f"seq_len must be >= 64 for building, got {self.seq_len}")
        from msrnn.bst.config import VARIANTS

        if self.bst_variant not in VARIANTS or self.bst_variant == "full":
            raise ConfigError(f"bst_variant must be a bounded variant (sh, mh, mf, slide), got {self.bst_variant!r}")


def _hooks(family: str) -> Any:
    if family not in BUILD_FAMILIES:
        raise ConfigError(f"cannot build {family!r}; use one of {', '.join(BUILD_FAMILIES)}")
    return FAMILIES.get(family).module()


def size_for_budget(family: str, base_config: Any, budget: int, bst_variant: str = "sh") -> dict[str, int] | None:
    """The family's size knobs whose state fits ``budget`` bytes (by the cost model, which tests tie to the
    implementations); None when no sensible size fits."""
    from msrnn.bench.costs import Arch

    return _hooks(family).size_for_budget(Arch.from_config(base_config), budget, bst_variant=bst_variant)


def build_key(base: str | Path, family: str, sizing: dict[str, int], cfg: BuildConfig) -> str:
    """Names a built model: base model (path and its msrnn.json), family, sizing and build settings."""
    base = Path(base)
    meta = (base / "msrnn.json").read_text() if (base / "msrnn.json").exists() else ""
    blob = json.dumps({"base": str(base.resolve()), "meta": meta, "family": family, "sizing": sizing,
                       "cfg": {k: v for k, v in asdict(cfg).items() if k != "families"}}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def make_model(family: str, base_model: Any, sizing: dict[str, int], cfg: BuildConfig) -> Any:
    """The untrained model of ``family`` at ``sizing``, holding (a copy of) the base model's weights."""
    import copy

    return _hooks(family).make(copy.deepcopy(base_model), sizing, seed=cfg.seed, bst_variant=cfg.bst_variant)


def _as_lm(family: str, model: Any) -> Any:
    return _hooks(family).as_lm(model)


def check_budget(budget: int) -> None:
    """A state budget is a positive number of bytes; anything else is an error, not "does not fit"."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"a state budget is a positive number of bytes, got {budget!r}; e.g. 262144 (256 KiB)")


def fit(family: str, base_model: Any, budget: int, cfg: BuildConfig) -> tuple[dict[str, int] | None, int]:
    """(sizing, measured peak state bytes): the cost model's sizing, shrunk until the untrained model's
    *measured* state (one token at a time, so every in-block offset is seen) fits ``budget``."""
    from msrnn.protocol import measure_state_bytes

    check_budget(budget)
    sizing = size_for_budget(family, base_model.config, budget, cfg.bst_variant)
    knob, step, floor = _hooks(family).SHRINK
    while sizing is not None and sizing[knob] >= floor:
        lm = _as_lm(family, make_model(family, base_model, sizing, cfg).eval())
        span = sizing.get("block_size", sizing.get("segment_length", 8))
        nbytes = measure_state_bytes(lm, tokens=2 * span + 16)
        if nbytes <= budget:
            return sizing, nbytes
        sizing = {**sizing, knob: sizing[knob] - step}
    return None, 0


def build(family: str, base: str | Path, budget: int, cfg: BuildConfig, root: str | Path | None = None,
          progress: bool = True) -> tuple[Path | None, dict[str, int] | None]:
    """Train (or reuse) ``family`` sized to ``budget`` from ``base``; returns (model dir, sizing), or
    (None, None) when the family cannot fit the budget."""
    from msrnn.io import cache_dir
    from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for
    from msrnn.train import TrainConfig
    from msrnn.train.pretrain import PretrainConfig, train_lm

    check_budget(budget)
    base_model = load_hf_causal_lm(base)
    sizing, _ = fit(family, base_model, budget, cfg)
    if sizing is None:
        return None, None
    root = Path(root) if root else cache_dir() / "models" / "built"
    out = root / f"{Path(base).name}-{family}-{budget}-{build_key(base, family, sizing, cfg)}"
    if (out / "msrnn.json").exists():  # written last by the trainer's export: the model is complete
        return out, sizing
    model = make_model(family, base_model, sizing, cfg)
    whole = getattr(_hooks(family), "train_seq_len", None)  # RMT: whole segments per training sequence
    seq_len = whole(cfg.seq_len, sizing) if whole else cfg.seq_len
    steps = -(-cfg.train_tokens // (seq_len * cfg.batch_size))  # train_tokens rounded up to whole steps
    train_lm(model, load_tokenizer_for(base), PretrainConfig(preset=None, data=cfg.data, seq_len=seq_len,
                                                             batch_size=cfg.batch_size, val_batches=2),
             TrainConfig(max_steps=steps, lr=cfg.lr, warmup_steps=max(1, steps // 10), eval_every=0, seed=cfg.seed),
             out, {"family": family, "built_from": str(base), "budget_bytes": budget, "sizing": sizing,
                   "build": asdict(cfg)}, resume=True, progress=progress)
    return out, sizing


def _load_trainable(family: str, path: Path) -> Any:
    """The model in ``path`` as a trainable module (an RMT is an AutoModel, the others causal LMs)."""
    if family == "kv":  # KV eviction tunes its plain base model
        from msrnn.models.loading import load_hf_causal_lm

        return load_hf_causal_lm(path)
    return _hooks(family).load_trainable(path)


def build_task(family: str, source: str | Path, tune: Any, root: str | Path | None = None,
               progress: bool = True) -> Path:
    """``source`` (a base model for the KV family, or a built model) fine-tuned on ``tune.task`` with
    ``msrnn.tasks.finetune`` (the same samples and steps for every family); cached next to built models."""
    from msrnn.io import cache_dir
    from msrnn.models.loading import load_tokenizer_for, read_meta
    from msrnn.tasks.finetune import task_tune

    source = Path(source)
    root = Path(root) if root else cache_dir() / "models" / "built"
    blob = json.dumps({"source": str(source.resolve()), "meta": read_meta(source), "tune": asdict(tune)},
                      sort_keys=True, default=str)
    out = root / f"{source.name}-{tune.task}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"
    if (out / "msrnn.json").exists():
        return out
    model = _load_trainable(family, source).train()
    meta = {k: v for k, v in read_meta(source).items() if k not in ("step", "task", "task_tune", "task_val_acc")}
    task_tune(model, load_tokenizer_for(source), tune, out,
              {**meta, "family": "hf" if family == "kv" else family, "tuned_from": str(source)}, progress=progress)
    return out
