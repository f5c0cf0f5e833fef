"""Verify msrnn's own families on the installed transformers before a model of theirs is used.

KV eviction is verified on a tiny twin of the user's model (:mod:`msrnn.kv.verify`); SUPRA, BST and RMT are msrnn's
own classes built on transformers' modules and generation, so each is verified the same way around a tiny random
Llama: a stream in any chunking equals token-by-token feeding, ``model.generate()`` picks the tokens ``msrnn
generate`` does, and the state advances (a chunk's logits depend on the chunk before it). A family takes part when
its spec names ``self_check`` knobs (nothing here names a family). Verdicts are cached like KV verdicts,
per (family, msrnn, torch, transformers); :func:`require_family_verified` refuses a family whose check fails,
naming it. ``msrnn doctor`` prints them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch

from msrnn.errors import ModelLoadError

CHECKS: dict[str, str] = {
    "chunks": "chunks equal token by token",
    "generate": "generate() equals msrnn generate",
    "state": "the state advances",
}
_MEMORY: dict[str, dict[str, str]] = {}


def tiny_llama() -> Any:
    """The base every family self-check builds on: a tiny random Llama (msrnn's own base architecture)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _ids(lm: Any, n: int = 24) -> torch.Tensor:
    return torch.randint(3, int(lm.vocab_size), (1, n), generator=torch.Generator().manual_seed(0))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _chunks(model: Any, lm: Any) -> None:
    from msrnn.protocol import stream_logits

    x = _ids(lm)
    one = stream_logits(lm, x, 1)
    for chunk in (5, 24):
        diff = _max_diff(one, stream_logits(lm, x, chunk))
        if diff > 1e-4:
            raise AssertionError(f"chunks of {chunk} differ from token by token by {diff:.2e}")


def _generate(model: Any, lm: Any) -> None:
    from msrnn.generate import generate

    x = _ids(lm, 12)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # both stop at it
    eos = eos[0] if isinstance(eos, list) else eos
    want = generate(lm, x, max_new_tokens=6, eos_token_id=eos)
    got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0)
    if not torch.equal(got[:, x.shape[1]:], want):
        raise AssertionError("model.generate() and msrnn generate chose different tokens")


def _state(model: Any, lm: Any) -> None:
    x = _ids(lm)
    state = lm.init_state(1)
    _, state = lm.forward_chunk(x[:, :12], state)
    after, _ = lm.forward_chunk(x[:, 12:], state)
    fresh, _ = lm.forward_chunk(x[:, 12:], lm.init_state(1))
    if _max_diff(after, fresh) < 1e-6:
        raise AssertionError("a chunk's logits do not depend on the chunk before it (the state did not advance)")


_RUN: dict[str, Callable[[Any, Any], None]] = {"chunks": _chunks, "generate": _generate, "state": _state}


def _key(name: str) -> str:
    import transformers

    from msrnn.version import __version__

    blob = json.dumps({"family": name, "msrnn": __version__, "torch": torch.__version__,
                       "transformers": transformers.__version__, "checks": sorted(CHECKS)}, sort_keys=True)
    return f"family-{name}-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def family_checks(family: Any, use_cache: bool = True) -> dict[str, str] | None:
    """``{check: "ok" | "failed: ..."}`` for a family spec that names ``self_check`` knobs (None otherwise)."""
    from msrnn.io import cache_dir, write_json

    if family.self_check is None:
        return None
    key = _key(family.name)
    path = cache_dir() / "verified" / f"{key}.json"
    if use_cache and key in _MEMORY:
        return _MEMORY[key]
    if use_cache:
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, dict) and set(cached) == set(CHECKS.values()):
                _MEMORY[key] = cached
                return cached
        except (OSError, ValueError):
            pass
    results: dict[str, str] = {}
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = family.make(copy.deepcopy(tiny_llama()), family.knobs(**family.self_check)).eval()
        lm = family.as_lm(model)
        for name, label in CHECKS.items():
            try:
                with torch.no_grad():
                    _RUN[name](model, lm)
                results[label] = "ok"
            except Exception as exc:  # noqa: BLE001 - a check that raises has failed
                results[label] = f"failed: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a family that cannot be built here fails every check
        results = {label: f"failed: could not build it ({type(exc).__name__}: {exc})" for label in CHECKS.values()}
    finally:
        torch.random.set_rng_state(rng)
    _MEMORY[key] = results
    try:
        write_json(path, results)
    except OSError:
        pass
    return results


def require_family_verified(family: Any) -> None:
    """Refuse a family whose self-check fails on the installed transformers, naming the check."""
    results = family_checks(family)
    failed = {k: v for k, v in (results or {}).items() if not v.startswith("ok")}
    if failed:
        import transformers

        check, why = next(iter(failed.items()))
        raise ModelLoadError(f"the {family.name} family is not verified on transformers {transformers.__version__}: "
                             f"check '{check}' {why}; `msrnn doctor` shows every check")
