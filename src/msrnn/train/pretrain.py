"""Pretraining recipe for the Llama base models (the ``msrnn pretrain`` command and the demo).

The ``small`` recipe follows the measurement in the foundation issue: lr 2e-3 with a slow cosine decay (to 10%)
and a quarter of each batch made of self-repeating sequences, so the model forms induction heads and uses its
context. Everything the run needs to be reproduced is written next to the model (``msrnn.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from msrnn.data import PACKINGS, LMBatches, load_tokenizer, save_tokenizer, token_stream, train_bpe
from msrnn.data.corpus import document_stream, training_specs
from msrnn.errors import ConfigError, MsrnnError
from msrnn.io import cache_dir
from msrnn.models.presets import PRESETS, build_model
from msrnn.train.config import TrainConfig
from msrnn.train.loss import training_forward
from msrnn.train.packing import DocumentBatches
from msrnn.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """What a pretraining run trains on: preset (None when training starts from an existing model), data, sequence
    length, batch."""
    preset: str | None = "small"
    data: str = "stdlib"
    tokenizer: str | None = None  # a tokenizer folder; None trains (and caches) a BPE on the train split
    vocab_size: int = 4096
    seq_len: int = 512
    batch_size: int = 8
    repeat_fraction: float = 0.25
    val_batches: int = 8
    attn_implementation: str = "sdpa"
    packing: str = "documents"  # see msrnn.data.batches: documents (states reset at boundaries) or stream

    def __post_init__(self) -> None:
        if self.preset is not None:
            PRESETS.get(self.preset)  # unknown preset -> one clear error listing the choices
        if self.seq_len < 8:
            raise ConfigError(f"seq_len must be >= 8, got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.val_batches < 0:
            raise ConfigError("val_batches must be >= 0")
        if self.packing not in PACKINGS:
            raise ConfigError(f"unknown packing {self.packing!r}; use one of {', '.join(PACKINGS)}")


def ensure_tokenizer(data: str, vocab_size: int = 4096, path: str | None = None) -> Any:
    """Load ``path``, or train a BPE on the train split of ``data`` and cache it by content."""
    if path:
        return load_tokenizer(path)
    train_spec, _ = training_specs(data)
    key, docs = document_stream(train_spec)  # hf: streams; nothing is read past the key on a cache hit
    target = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{key}"
    if (target / "tokenizer.json").exists():
        return load_tokenizer(target)
    log.info("training a %d-token BPE on %s", vocab_size, train_spec.label)
    tok = train_bpe((d.text for d in docs), vocab_size=vocab_size)
    try:
        save_tokenizer(tok, target)
    except FileExistsError:
        pass
    return load_tokenizer(target)


def make_val_fn(batches: LMBatches | None, n: int, form: Callable[[dict], dict] | None = None):
    """A validation function over fixed batches (mean loss), or None. ``form`` lays a batch out as training does
    (:meth:`~msrnn.train.packing.DocumentBatches.form`), when it is called."""
    if batches is None or n == 0:
        return None
    fixed = [batches.batch(i) for i in range(n)]

    def val_fn(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        laid = [form(b) for b in fixed] if form is not None else fixed
        losses = [float(training_forward(model, {k: v.to(device) for k, v in b.items()})["loss"]) for b in laid]
        return {"val_loss": sum(losses) / len(losses)}

    return val_fn


def train_lm(model: torch.nn.Module, tokenizer: Any, cfg: PretrainConfig, train_cfg: TrainConfig,
             out_dir: str | Path, meta: dict[str, Any], resume: bool = False,
             progress: bool = True) -> tuple[Trainer, TrainResult]:
    """Train any causal LM on ``cfg.data`` with the shared trainer and export a model directory.

    Used for pretraining a preset and for uptraining (e.g. a converted SUPRA model: all parameters train).
    """
    out_dir = Path(out_dir)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.seq_len > limit:
        raise ConfigError(f"--seq-len {cfg.seq_len} is past this model's {limit} positions; train with --seq-len "
                          f"<= {limit} (or a preset with more positions)")
    train_spec, val_spec = training_specs(cfg.data)
    from msrnn.train.trainer import process_state

    # Rank 0 tokenizes into the on-disk cache (streaming hf: corpora); the other ranks wait and map its file.
    with process_state().main_process_first():
        stream = token_stream(train_spec, tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    batches = LMBatches(stream, cfg.seq_len, cfg.batch_size, eos, cfg.repeat_fraction, seed=train_cfg.seed,
                        packing=cfg.packing)
    # documents: each model gets the packed batch or one row per document, whichever it honours (checked below)
    source = DocumentBatches(batches.batch, pad_id=eos) if cfg.packing == "documents" else None
    val_batches = None
    if val_spec is None:
        log.info("training on all of %s with no validation split (name one with %s:train)", train_spec.name,
                 train_spec.name)
    else:
        try:
            with process_state().main_process_first():
                val_stream = token_stream(val_spec, tokenizer)
            val_batches = LMBatches(val_stream, cfg.seq_len, cfg.batch_size, eos, 0.0, seed=12345,
                                    packing=cfg.packing)
        except MsrnnError as exc:  # a tiny corpus may have no val split; training still makes sense
            log.warning("no validation data (%s); training without it", exc)
    trainer = Trainer(
        model, train_cfg, source or batches.batch, out_dir,
        val_fn=make_val_fn(val_batches, cfg.val_batches, source.form if source else None),
        tokens_per_step=batches.tokens_per_batch, save_extra=lambda d: tokenizer.save_pretrained(str(d)),
        progress=progress, run={**asdict(cfg), **meta},
    )
    if source is not None:  # on the model as it trains: placed, cast and (under --fsdp) sharded
        source.choose(trainer.accelerator.unwrap_model(trainer.model))
    if resume and not trainer.resume():
        log.info("no checkpoint in %s; starting from scratch", out_dir)
    result = trainer.train()
    params = sum(p.numel() for p in model.parameters())
    trainer.export(meta={
        **meta, "params": params, "train_tokens": result.tokens, "total_steps": trainer.step,
        "data": asdict(cfg), "train": train_cfg.to_dict(), "train_seconds": round(result.seconds, 1),
        "final_loss": result.final_loss, "packing": source.record() if source else {"packing": cfg.packing},
        "val_loss": next((h["val_loss"] for h in reversed(result.history) if "val_loss" in h), None),
    })
    return trainer, result


def pretrain(cfg: PretrainConfig, train_cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
             progress: bool = True) -> tuple[Trainer, TrainResult]:
    """Train a preset model on ``cfg.data`` and write a model directory (weights + tokenizer + meta)."""
    tokenizer = ensure_tokenizer(cfg.data, cfg.vocab_size, cfg.tokenizer)
    if cfg.tokenizer:  # record the size the run used, not the unused default
        cfg = replace(cfg, vocab_size=len(tokenizer))
    model = build_model(cfg.preset, len(tokenizer), seed=train_cfg.seed, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, attn_implementation=cfg.attn_implementation)
    return train_lm(model, tokenizer, cfg, train_cfg, out_dir, {"family": "hf", "preset": cfg.preset},
                    resume=resume, progress=progress)
