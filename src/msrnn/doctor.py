"""``msrnn doctor``: what msrnn verified on this machine's torch and transformers, as rows of a table.

* the versions and every transformers contract (:data:`msrnn.compat.CONTRACTS`);
* KV eviction on a model (its tiny twin's verdict, check by check: :mod:`msrnn.kv.verify`), a tiny Llama by default;
* each of msrnn's own families (SUPRA, BST, RMT) built around a tiny Llama on the installed transformers
  (:mod:`msrnn.models.selfcheck`, which ``load_lm`` also runs before loading one);
* ``--architectures``: every causal-LM type the installed transformers ships, verified or refused with its reason
  (:func:`msrnn.kv.verify.check_architecture`).

Nothing here branches on a family name: the families come from :data:`msrnn.families.FAMILIES` and their specs.
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


def version_rows() -> list[Row]:
    import transformers

    from msrnn.compat import CONTRACTS, TRANSFORMERS_RANGE, TRANSFORMERS_TESTED
    from msrnn.version import __version__

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
    """Each family with a self-check (:mod:`msrnn.models.selfcheck`), check by check."""
    from msrnn.families import FAMILIES
    from msrnn.models.selfcheck import family_checks

    rows = []
    for family in FAMILIES.values():
        for check, result in (family_checks(family) or {}).items():
            rows.append(Row(family.name, check, result))
    return rows


def model_from_config_source(source: str) -> Any:
    """A randomly initialised model of the class and config a model folder (or hub name) names: verification needs
    only the config, never the weights, and never runs code from the folder."""
    from transformers import AutoConfig

    from msrnn.models.loading import reject_remote_code

    reject_remote_code(source)
    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read a config from {source}: {str(exc).splitlines()[0]}") from exc
    from msrnn.kv.verify import tiny_of_config

    try:
        twin = tiny_of_config(cfg)
    except Exception as exc:  # noqa: BLE001 - no causal-LM class, TwinError or the model's own error
        raise ModelLoadError(f"{source}: msrnn cannot build a tiny {cfg.model_type} to verify ({exc})") from exc
    return _with_config(twin, cfg)


def _with_config(twin: Any, cfg: Any) -> Any:
    """The twin, but answering verification with the user's own (unshrunk) config, so its layer mapping and cache
    key are the user's model's."""
    twin.config = copy.deepcopy(cfg)
    twin.config._attn_implementation = getattr(cfg, "_attn_implementation", None) or "sdpa"
    return twin
