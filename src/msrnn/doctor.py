"""``msrnn doctor``: what msrnn verified on this machine's torch and transformers, as rows of a table.

* the versions and every transformers contract (:data:`msrnn.compat.CONTRACTS`);
* KV eviction on a model (its tiny twin's verdict, check by check: :mod:`msrnn.kv.verify`), a tiny Llama by default;
* each buildable family (SUPRA, BST, RMT) built around a tiny Llama on the installed transformers: streaming in any
  chunking equals token-by-token feeding and the parallel forward, ``generate()`` equals ``msrnn generate``, and the
  state advances (a chunk's logits depend on the chunk before it);
* ``--architectures``: every causal-LM type the installed transformers ships, verified or refused with its reason
  (:func:`msrnn.kv.verify.check_architecture`).

Nothing here branches on a family name: the families come from :data:`msrnn.families.FAMILIES` and their hooks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from msrnn.errors import ModelLoadError


@dataclass
class Row:
    """One line of the doctor's table."""

    subject: str
    check: str
    result: str  # "ok", "failed: ...", "refused: ...", "not run: ..."

    @property
    def ok(self) -> bool:
        return self.result.startswith("ok") or self.result.startswith("not run")


def version_rows() -> list[Row]:
    import transformers

    from msrnn import __version__
    from msrnn.compat import CONTRACTS, TRANSFORMERS_RANGE, TRANSFORMERS_TESTED

    rows = [Row("versions", "msrnn", __version__), Row("versions", "torch", torch.__version__),
            Row("versions", "transformers", f"{transformers.__version__} (declared {TRANSFORMERS_RANGE}, newest "
                                            f"tested {TRANSFORMERS_TESTED})")]
    for name, check in CONTRACTS.items():
        try:
            check()
            rows.append(Row("transformers contract", name, "ok"))
        except Exception as exc:  # noqa: BLE001 - a contract that moved is reported, not raised
            rows.append(Row("transformers contract", name, f"failed: {type(exc).__name__}: {exc}"))
    return rows


def tiny_llama() -> Any:
    """The base every self-check builds on: a tiny random Llama (msrnn's own base architecture)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def kv_rows(model: Any, subject: str) -> list[Row]:
    """The KV verdict of ``model`` (its class and config) as rows, one per check."""
    from msrnn.kv.lm import check_supported
    from msrnn.kv.verify import verdict_for

    try:
        check_supported(model)
    except ModelLoadError as exc:
        return [Row(subject, "KV eviction", f"refused: {exc}")]
    verdict = verdict_for(model)
    rows = [Row(subject, f"kv: {name}", result) for name, result in verdict.checks.items()]
    rows.append(Row(subject, "KV eviction", "ok (verified)" if verdict.ok else f"refused: {verdict.reason}"))
    if verdict.ok:
        rows.append(Row(subject, "positions='rolling'",
                        "ok" if verdict.rolling else f"refused: {verdict.rolling_reason}"))
    return rows


def family_rows() -> list[Row]:
    """Each buildable family around a tiny Llama: chunk invariance, generate() = msrnn generate, state advances."""
    from msrnn.bench.costs import Arch
    from msrnn.families import FAMILIES

    rows = []
    base = tiny_llama()
    for family in FAMILIES.values():
        if not family.buildable:
            continue
        hooks = family.module()
        try:
            sizing = hooks.size_for_budget(Arch.from_config(base.config), 64 * 1024)
            if sizing is None:
                raise RuntimeError("no sizing fits 64 KiB")
            torch.manual_seed(0)
            model = hooks.make(copy.deepcopy(base), sizing).eval()
            lm = hooks.as_lm(model)
        except Exception as exc:  # noqa: BLE001 - a family that cannot be built here is reported
            rows.append(Row(family.name, "build around a tiny Llama", f"failed: {type(exc).__name__}: {exc}"))
            continue
        for name, fn in (("chunks equal token by token", _chunk_invariance),
                         ("generate() equals msrnn generate", _generate_matches),
                         ("the state advances", _state_advances)):
            try:
                with torch.no_grad():
                    fn(model, lm)
                rows.append(Row(family.name, name, "ok"))
            except Exception as exc:  # noqa: BLE001
                rows.append(Row(family.name, name, f"failed: {type(exc).__name__}: {exc}"))
    return rows


def _ids(lm: Any, n: int = 24) -> torch.Tensor:
    return torch.randint(3, int(lm.vocab_size), (1, n), generator=torch.Generator().manual_seed(0))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _chunk_invariance(model: Any, lm: Any) -> None:
    from msrnn.protocol import stream_logits

    x = _ids(lm)
    one = stream_logits(lm, x, 1)
    for chunk in (5, 24):
        diff = _max_diff(one, stream_logits(lm, x, chunk))
        if diff > 1e-4:
            raise AssertionError(f"chunks of {chunk} differ from token by token by {diff:.2e}")


def _generate_matches(model: Any, lm: Any) -> None:
    from msrnn.generate import generate

    x = _ids(lm, 12)
    want = generate(lm, x, max_new_tokens=6)
    got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0)
    if not torch.equal(got[:, x.shape[1]:], want):
        raise AssertionError("model.generate() and msrnn generate chose different tokens")


def _state_advances(model: Any, lm: Any) -> None:
    x = _ids(lm)
    state = lm.init_state(1)
    _, state = lm.forward_chunk(x[:, :12], state)
    after, _ = lm.forward_chunk(x[:, 12:], state)
    fresh, _ = lm.forward_chunk(x[:, 12:], lm.init_state(1))
    if _max_diff(after, fresh) < 1e-6:
        raise AssertionError("a chunk's logits do not depend on the chunk before it (the state did not advance)")


def model_from_config_source(source: str) -> Any:
    """A randomly initialised model of the class and config a model folder (or hub name) names: verification needs
    only the config, never the weights, and never runs code from the folder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from msrnn.models.loading import reject_remote_code

    reject_remote_code(source)
    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read a config from {source}: {str(exc).splitlines()[0]}") from exc
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(cfg), None)
    if cls is None:
        raise ModelLoadError(f"{source}: transformers has no causal-LM class for model type {cfg.model_type!r}")
    from msrnn.kv.verify import build_twin, twin_config

    tiny, _ = twin_config(cfg)
    try:
        twin = build_twin(cls, tiny)
    except Exception as exc:  # noqa: BLE001 - TwinError or the model's own error
        raise ModelLoadError(f"{source}: msrnn cannot build a tiny {cfg.model_type} to verify ({exc})") from exc
    return _with_config(twin, cfg)


def _with_config(twin: Any, cfg: Any) -> Any:
    """The twin, but answering verification with the user's own (unshrunk) config, so its layer mapping and cache
    key are the user's model's."""
    twin.config = copy.deepcopy(cfg)
    twin.config._attn_implementation = getattr(cfg, "_attn_implementation", None) or "sdpa"
    return twin
