"""Byte-level BPE tokenizers trained with the ``tokenizers`` library, or any HF tokenizer by path.

Trained tokenizers add no special tokens when encoding, so ``tokenizer(text)["input_ids"]`` is exactly the
text's tokens (what the streaming evaluator scores). ``<|endoftext|>`` separates documents in training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from msrnn.errors import ConfigError, ModelLoadError
from msrnn.io import atomic_dir

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE tokenizer; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 1:
        raise ConfigError(f"vocab_size {vocab_size} is too small for byte-level BPE; use at least 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None)


def save_tokenizer(tokenizer: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Save atomically (the directory appears complete or not at all)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def load_tokenizer(path: str | Path) -> Any:
    """A saved tokenizer folder as a transformers fast tokenizer."""
    from transformers import AutoTokenizer

    if not Path(path).exists() and str(path).startswith((".", "/", "~")):
        raise ModelLoadError(f"tokenizer path {path} does not exist; create one with 'msrnn tokenizer --out {path}'")
    from msrnn.models.loading import reject_remote_code

    reject_remote_code(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load a tokenizer from {path} ({type(exc).__name__}); is it a tokenizer folder?"
        ) from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocab, merges, normalisation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Tokenize many texts with no special tokens, in parallel when the tokenizer is a fast one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
