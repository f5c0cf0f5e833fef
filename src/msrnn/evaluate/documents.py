"""Held-out documents as token arrays, tokenized exactly as the model's tokenizer does by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from msrnn.data.corpus import load_documents, parse_data_spec
from msrnn.errors import ConfigError, DataError


@dataclass
class TokenDoc:
    """A held-out document's name and token ids."""
    name: str
    ids: np.ndarray  # [n] int64


def eval_documents(data: str, tokenizer: Any, unit: str = "file", max_documents: int | None = None,
                   min_tokens: int = 2, max_tokens: int | None = None, add_bos: bool = False) -> list[TokenDoc]:
    """Documents of ``data`` (default split ``test``) with at least ``min_tokens`` tokens, in name order.

    Tokens are ``tokenizer(text)["input_ids"]`` (no extra special tokens); ``add_bos`` prepends BOS when the
    tokenizer did not already.
    """
    if tokenizer is None:
        raise DataError("this model has no tokenizer; save one in the model directory")
    if add_bos and tokenizer.bos_token_id is None:
        raise DataError("add_bos asks for a BOS token, but this model's tokenizer has none; drop --add-bos")
    # 0 or a negative count would slice silently (ids[:0] is "no truncation" here, ids[:-5] drops five tokens).
    for name, value, least in (("max_tokens", max_tokens, 1), ("max_documents", max_documents, 1),
                               ("min_tokens", min_tokens, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{name} must be an integer >= {least} or None, got {value!r}")
    spec = parse_data_spec(data, default_split="test")
    out = []
    for doc in load_documents(spec, unit=unit):
        ids = tokenizer(doc.text)["input_ids"]
        if add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id, *ids]
        if len(ids) < min_tokens:
            continue
        out.append(TokenDoc(doc.name, np.asarray(ids[:max_tokens] if max_tokens is not None else ids, dtype=np.int64)))
        if max_documents and len(out) >= max_documents:
            break
    if not out:
        raise DataError(f"no document in {spec.label} has {min_tokens}+ tokens; lower --min-tokens or use more data")
    return out
