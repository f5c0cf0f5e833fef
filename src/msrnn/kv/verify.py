"""Verify, on the user's own model class and config and the installed torch/transformers, that KV eviction is exact.

msrnn's eviction path replaces a model's attention with its own (``msrnn_sdpa``/``msrnn_eager``): it builds its own
masks, scores slots from q and k, and re-rotates keys for rolling positions. That is exact only while the model
computes attention the way msrnn assumes, and transformers adds architectures every month. So instead of a list of
known-good models, :func:`verdict_for` builds a **tiny random twin** of the user's model (the same model class and
config, every attention-relevant setting kept: model type, attention implementation, RoPE type and parameters, layer
types, sinks, softcap, scaling; widths, vocabulary and expert counts shrunk; enough layers to hold every distinct
per-layer setting) and proves each assumption on it, in fp32 on the CPU:

``registry``            every layer attends through transformers' attention-function registry, once per forward
``full-budget``         with budget >= length, the bounded model equals the plain one (logits of a chunked stream,
                        greedy ``generate``, and a left-padded batch)
``chunk-invariance``    under eviction (TOVA, H2O, sinks), exact prefill in any chunking equals token-by-token feeding,
                        and fixed storage equals the naive layout
``window-reference``    window and sink eviction equal the plain model under the equivalent attention mask (an
                        independent reference: transformers' own attention with a custom mask)
``scored-probabilities`` the probabilities TOVA scores equal the ones the plain model attends with (its eager
                        attention weights)
``bounded``             every layer holds at most ``budget`` slots and the state stops growing
``rolling``             (for ``positions='rolling'`` only) each layer's queries and keys move with position exactly
                        as one of the model's rotary buffers turns them in one channel layout (or not at all: a NoPE
                        layer); found by shifting every position by a constant, which RoPE attention is invariant to

Features msrnn cannot honour are refused by name before any check (a sliding window, a logit softcap, chunked
attention, ALiBi); the checks name the rest (attention outside the registry, several attention calls per layer,
caches that hold something other than the keys attended, e.g. MLA's latents). A verdict is cached in memory and on
disk under ``$MSRNN_CACHE/verified/`` per (model class, twin config, attention implementation, msrnn, torch and
transformers versions), so the cost (about a second) is paid once. ``msrnn doctor`` prints the verdicts.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from msrnn.errors import ModelLoadError, one_line
from msrnn.kv.rope import Rotation, rotary_buffers

log = logging.getLogger(__name__)

VERIFY_VERSION = 2  # bump when a check changes, so cached verdicts are recomputed
CHECKS = ("registry", "full-budget", "chunk-invariance", "window-reference", "scored-probabilities", "bounded")
_TOL = 2e-4  # fp32 on tiny random models: paths that differ only in summation order agree to ~1e-6
_T = 20  # tokens each check streams

# Width, vocabulary and expert counts of the twin (only attributes the config has are set).
_SHRINK: dict[str, int] = {
    "hidden_size": 64, "intermediate_size": 64, "ffn_hidden_size": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_attention_heads": 4, "head_dim": 16, "vocab_size": 256,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "rotary_dim": 8, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
_AT_MOST: dict[str, int] = {
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "moe_num_experts": 4, "moe_k": 2, "n_group": 1, "topk_group": 1, "max_position_embeddings": 4096,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id")
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
_MIN_LAYERS = 4  # patterns set in code rather than in a per-layer list (e.g. every 4th layer) get covered too


@dataclass
class Verdict:
    """What verification found for one model class and config."""

    model_type: str
    ok: bool
    reason: str | None = None  # why the model is refused (the failed check or the named feature)
    checks: dict[str, str] = field(default_factory=dict)  # check -> "ok" / "failed: ..." / "not run: ..."
    rolling: list[dict[str, Any]] | None = None  # per user layer: {"layout", "source"}; None when refused
    rolling_reason: str | None = None  # why positions='rolling' is refused
    seconds: float = 0.0
    key: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CheckFailed(Exception):
    """One verification check did not hold (the message says what differed)."""


class TwinError(Exception):
    """The tiny twin could not be built or run, so nothing was verified."""


# --------------------------------------------------------------------------- features refused by name
def named_refusals(model: Any) -> list[str]:
    """Attention features msrnn's eviction path cannot honour, read from the config (each with its fix)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    reasons = []
    window = getattr(cfg, "sliding_window", None)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    if window and getattr(cfg, "use_sliding_window", True) and (not layer_types or "sliding_attention" in
                                                                layer_types):
        reasons.append(f"its sliding window of {window} tokens (kept tokens older than the window would be "
                       "attended; set model.config.sliding_window = None to attend the whole cache on purpose)")
    if "local" in str(getattr(cfg, "attention_layers", "")):
        reasons.append(f"its local attention window of {getattr(cfg, 'window_size', '?')} tokens (GPT-Neo's local "
                       "layers)")
    if getattr(cfg, "attn_logit_softcapping", None):
        reasons.append(f"its attention logit softcap of {cfg.attn_logit_softcapping} (set "
                       "model.config.attn_logit_softcapping = None to drop it on purpose)")
    if getattr(cfg, "attention_chunk_size", None) or "chunked_attention" in layer_types:
        reasons.append("its chunked attention (attention_chunk_size: queries attend only inside their chunk, "
                       "which a bounded cache of past slots cannot express)")
    other = sorted({t for t in layer_types if isinstance(t, str)} - _ATTENTION_LAYER_TYPES)
    if other:
        reasons.append(f"its non-attention layers ({', '.join(other)}: recurrent or linear-attention layers keep a "
                       "state of their own in transformers' hybrid cache, which msrnn's eviction cache does not hold)")
    if getattr(cfg, "kv_lora_rank", None):
        reasons.append("multi-head latent attention (MLA: the cache holds compressed latents, not the keys and "
                       "values each head attends, so there are no per-token slots to score and evict)")
    attn_config = getattr(cfg, "attn_config", None)
    if (cfg.model_type == "bloom" or getattr(cfg, "alibi", False) or getattr(attn_config, "alibi", False)
            or (isinstance(attn_config, dict) and attn_config.get("alibi"))
            or getattr(cfg, "position_embedding_type", None) == "alibi"):
        reasons.append("ALiBi position biases (added inside the model's own attention, by distance, which "
                       "eviction's kept slots would have to carry)")
    return reasons


# --------------------------------------------------------------------------- the tiny twin
def _layer_count(cfg: Any) -> int | None:
    n = getattr(cfg, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def _per_layer_lists(cfg: Any, n_layers: int) -> dict[str, list[Any]]:
    """Config attributes holding one value per layer (layer_types, no_rope_layers, ...)."""
    out = {}
    for name, value in vars(cfg).items():
        if isinstance(value, list | tuple) and len(value) == n_layers and n_layers > 1 and not name.startswith("_"):
            if all(isinstance(v, str | int | float | bool | type(None)) for v in value):
                out[name] = list(value)
    return out


def layer_signatures(cfg: Any) -> list[tuple[Any, ...]]:
    """Per layer, the tuple of its per-layer config values (equal tuples: layers configured alike)."""
    n = _layer_count(cfg) or 1
    lists = _per_layer_lists(cfg, n)
    return [tuple(lists[name][i] for name in sorted(lists)) for i in range(n)]


def _set(cfg: Any, name: str, value: Any) -> None:
    try:
        setattr(cfg, name, value)
    except (AttributeError, TypeError, ValueError):  # a read-only property (derived from other fields)
        pass


def _shrink(cfg: Any) -> list[int]:
    """Shrink ``cfg`` in place (and its sub-configs); returns, per original layer, the twin layer configured alike."""
    from transformers import PretrainedConfig

    for name, value in list(vars(cfg).items()):
        if isinstance(value, PretrainedConfig) and not name.startswith("_"):
            _shrink(value)
    n = _layer_count(cfg) or 1
    sigs = layer_signatures(cfg)
    lists = _per_layer_lists(cfg, n)
    # The fewest layers that still show every distinct per-layer setting (at least _MIN_LAYERS when there are).
    need = min(n, _MIN_LAYERS)
    seen: set[tuple[Any, ...]] = set()
    for i, sig in enumerate(sigs):
        if sig not in seen:
            seen.add(sig)
            need = max(need, i + 1)
    if _layer_count(cfg) is not None:
        _set(cfg, "num_hidden_layers", need)
    for name, values in lists.items():
        _set(cfg, name, values[:need])
    first: dict[tuple[Any, ...], int] = {}
    for i, sig in enumerate(sigs[:need]):
        first.setdefault(sig, i)
    mapping = [first[sig] if sig in first else min(i, need - 1) for i, sig in enumerate(sigs)]
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None)
    for name, value in _SHRINK.items():
        if isinstance(getattr(cfg, name, None), int):
            _set(cfg, name, value)
    if isinstance(kv, int) and isinstance(heads, int):
        _set(cfg, "num_key_value_heads", 4 if kv == heads else 1 if kv == 1 else 2)  # keep MHA / MQA / GQA
    for name, cap in _AT_MOST.items():
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > cap:
            _set(cfg, name, cap)
    vocab = getattr(cfg, "vocab_size", None) or 256
    for name in _TOKEN_IDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= vocab:
            _set(cfg, name, vocab - 1 - _TOKEN_IDS.index(name))
        elif isinstance(value, list):
            _set(cfg, name, [v for v in value if isinstance(v, int) and v < vocab] or [vocab - 3])
    # transformers 5 names it ``dtype``; ``torch_dtype`` is its deprecated alias (reading it warns), kept only for a
    # config that has no ``dtype`` of its own.
    name = "dtype" if "dtype" in vars(cfg) else "torch_dtype"
    if getattr(cfg, name, None) is not None:
        _set(cfg, name, torch.float32)
    return mapping


def twin_config(config: Any) -> tuple[Any, list[int]]:
    """A shrunk copy of ``config`` and, for each of the user's (text) layers, the twin layer configured like it."""
    cfg = copy.deepcopy(config)
    mapping = _shrink(cfg)
    text = getattr(cfg, "text_config", None)
    if text is not None and text is not cfg:
        mapping = _shrink_mapping(getattr(config, "text_config", config))
    return cfg, mapping


def _shrink_mapping(config: Any) -> list[int]:
    return _shrink(copy.deepcopy(config))


def _attn_base(model: Any) -> str:
    current = model.config._attn_implementation or "sdpa"
    current = current.removeprefix("msrnn_")
    return current if current in ("sdpa", "eager") else "sdpa"


def _cache_key(model: Any, tiny_cfg: Any, base: str) -> tuple[str, dict[str, str]]:
    import transformers

    from msrnn.version import __version__

    versions = {"msrnn": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "verify": str(VERIFY_VERSION)}
    cfg = tiny_cfg.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "architectures", "_attn_implementation_autoset",
                     "name_or_path"):
        cfg.pop(volatile, None)
    cls = type(model)
    blob = json.dumps({"class": f"{cls.__module__}.{cls.__qualname__}", "config": cfg, "attention": base,
                       "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32], versions


# --------------------------------------------------------------------------- the checks
def _close(name: str, ref: torch.Tensor, got: torch.Tensor) -> None:
    ref, got = ref.detach().double(), got.detach().double()
    if ref.shape != got.shape:
        raise CheckFailed(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        raise CheckFailed(f"{name}: non-finite values")
    err = (ref - got).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    if err > _TOL * scale:
        raise CheckFailed(f"{name}: max difference {err:.2e}")


def _stream(lm: Any, ids: torch.Tensor, sizes: list[int] | int) -> torch.Tensor:
    """Logits of ``ids`` fed through ``lm``'s protocol in chunks of ``sizes`` (a list cycles; an int repeats)."""
    state = lm.init_state(ids.shape[0])
    outs, t, i = [], 0, 0
    sizes = [sizes] if isinstance(sizes, int) else sizes
    while t < ids.shape[1]:
        n = sizes[i % len(sizes)]
        logits, state = lm.forward_chunk(ids[:, t : t + n], state)
        outs.append(logits)
        t, i = t + n, i + 1
    return torch.cat(outs, dim=1)


def _window_mask(T: int, budget: int, sinks: int) -> torch.Tensor:
    """[1, 1, T, T] additive mask: token i attends itself, the ``budget - sinks`` tokens before it and the first
    ``sinks`` tokens (what window/sink eviction keeps between tokens, fed token by token)."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i) & ((j >= i - (budget - sinks)) | (j < sinks))  # the budget's slots, then the token itself
    return torch.zeros(T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def _run_checks(plain: Any, twin: Any, base: str, verdict: Verdict) -> None:
    from msrnn.compat import cache_kwargs
    from msrnn.kv.attention import recording_calls
    from msrnn.kv.engine import BoundedKVLM as KVEvictionLM  # the engine users' KVEvictionLM runs, unverified
    from msrnn.kv.engine import _prepare
    from msrnn.kv.engine import bounded_cache as make_cache
    from msrnn.kv.policies import TOVA, make_policy

    vocab = int(plain.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, _T), generator=g)
    n_layers = plain.config.num_hidden_layers

    def check(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except CheckFailed as exc:
            verdict.checks[name] = f"failed: {exc}"
            raise
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any error inside a check is that check failing
            verdict.checks[name] = f"failed: {type(exc).__name__}: {one_line(exc, 300)}"
            raise CheckFailed(f"{name}: {type(exc).__name__}: {one_line(exc, 300)}") from exc
        verdict.checks.setdefault(name, "ok")

    with torch.no_grad():
        try:
            ref = plain(ids).logits
        except Exception as exc:  # noqa: BLE001 - the twin itself does not run: nothing can be verified
            raise TwinError(f"msrnn could not run a tiny twin of this {verdict.model_type} model to verify it "
                            f"({type(exc).__name__}: {one_line(exc, 300)})") from exc
        _prepare(twin, base)

        def registry() -> None:
            with recording_calls() as calls:
                twin(ids)
            layers = [id(c[0]) for c in calls]
            if not layers:
                raise ModelLoadError(_registry_reason(plain))
            if len(layers) != len(set(layers)):
                raise ModelLoadError(f"{type(plain).__name__} calls the attention function more than once per layer "
                                     "(as DiffLlama's differential attention does); KV eviction evicts in one call")
            _close("plain forward through msrnn's attention function", ref, twin(ids).logits)

        check("registry", registry)

        def full_budget() -> None:
            big = KVEvictionLM(twin, make_policy("tova", 4 * _T))
            _close("stream in chunks [7, 1, 5, 2]", ref, _stream(big, ids, [7, 1, 5, 2]))
            kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
            want = plain.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            got = twin.generate(ids, attention_mask=torch.ones_like(ids), **kw,
                                **cache_kwargs(make_cache(twin, make_policy("tova", 4 * _T)), twin))
            if not torch.equal(want, got):
                raise CheckFailed("greedy generate differs from the plain model's")
            short = ids[:, 5:]
            padded = torch.cat([torch.zeros(1, 5, dtype=ids.dtype), short], dim=1).repeat(2, 1)
            padded[1] = ids[0]
            mask = torch.ones_like(padded)
            mask[0, :5] = 0
            cache = make_cache(twin, make_policy("tova", 4 * _T))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded row
            out = twin(padded, attention_mask=mask, position_ids=positions, **cache_kwargs(cache, twin)).logits
            _close("left-padded batch, padded row", plain(short).logits[0], out[0, 5:])
            _close("left-padded batch, full row", ref[0], out[1])

        check("full-budget", full_budget)

        budget = 6

        def chunk_invariance() -> None:
            for name, opts in (("tova", {}), ("h2o", {}), ("sink", {"sinks": 2})):
                lm = KVEvictionLM(twin, make_policy(name, budget, **opts))
                one = _stream(lm, ids, 1)
                _close(f"{name}: chunks [9, 1, 4] against token by token", one, _stream(lm, ids, [9, 1, 4]))
            fixed = KVEvictionLM(twin, make_policy("tova", budget), storage="fixed")
            naive = KVEvictionLM(twin, make_policy("tova", budget))
            _close("tova: fixed storage against naive", _stream(naive, ids, 1), _stream(fixed, ids, 1))

        check("chunk-invariance", chunk_invariance)

        def window_equals_masked_plain() -> None:
            for name, sinks in (("window", 0), ("sink", 2)):
                opts = {"sinks": sinks} if sinks else {}
                lm = KVEvictionLM(twin, make_policy(name, budget, **opts))
                try:
                    want = plain(ids, attention_mask=_window_mask(_T, budget, sinks),
                                 position_ids=torch.arange(_T)[None]).logits
                except Exception as exc:  # noqa: BLE001 - the reference, not msrnn, cannot run
                    verdict.checks["window-reference"] = ("not run: the model does not take a custom 4D attention "
                                                          f"mask ({type(exc).__name__})")
                    return
                _close(f"{name} eviction against the plain model under its mask", want, _stream(lm, ids, [5, 1, 3]))

        check("window-reference", window_equals_masked_plain)

        def scored_probabilities() -> None:
            seen: list[torch.Tensor] = []

            class Recording(TOVA):
                def score(self, c):  # noqa: ANN001, ANN202 - the Policy signature
                    seen.append(c.last.clone())
                    return super().score(c)

            lm = KVEvictionLM(twin, Recording(budget=_T - 1))
            _stream(lm, ids, [_T - 1, 1])
            try:
                eager = copy.deepcopy(plain)
                eager.set_attn_implementation("eager")
                att = eager(ids, output_attentions=True).attentions
            except Exception as exc:  # noqa: BLE001 - the reference, not msrnn, cannot run
                verdict.checks["scored-probabilities"] = f"not run: no eager attention weights ({type(exc).__name__})"
                return
            if not att or any(a is None for a in att):
                verdict.checks["scored-probabilities"] = "not run: the model returns no attention weights"
                return
            if len(seen) != n_layers:
                raise CheckFailed(f"TOVA scored {len(seen)} layers, the model has {n_layers}")
            for layer, (mine, theirs) in enumerate(zip(seen, att, strict=True)):
                _close(f"layer {layer}: TOVA's scores against the attention weights",
                       theirs[:, :, -1].float().mean(1), mine[:, 0])

        check("scored-probabilities", scored_probabilities)

        def bounded() -> None:
            lm = KVEvictionLM(twin, make_policy("tova", budget))
            state = lm.init_state(1)
            sizes = []
            for t in range(_T):
                _, state = lm.forward_chunk(ids[:, t : t + 1], state)
                if t >= budget:
                    sizes.append(lm.state_nbytes(state))
                slots = max(layer.num_slots() for layer in state.cache.layers)
                if slots > budget:
                    raise CheckFailed(f"a layer holds {slots} slots at budget {budget}")
            if len(set(sizes)) != 1:
                raise CheckFailed(f"state bytes keep changing once full: {sorted(set(sizes))}")

        check("bounded", bounded)


def _rolling_rules(plain: Any, base: str) -> list[Rotation]:
    """Each twin layer's rotation, found by shifting every position by a constant: RoPE attention is invariant to
    that, so every layer sees the same inputs and its queries and keys differ exactly by its rotation."""
    from msrnn.kv.attention import recording_calls
    from msrnn.kv.engine import _prepare
    from msrnn.kv.rope import rotate

    buffers = rotary_buffers(plain)
    if not buffers:
        raise CheckFailed("the model has no rotary inverse-frequency buffer (no RoPE to re-rotate)")
    model = copy.deepcopy(plain)
    _prepare(model, base)
    ids = torch.randint(3, int(plain.config.vocab_size), (1, 8), generator=torch.Generator().manual_seed(1))
    shift = 5
    with torch.no_grad(), recording_calls() as at0:
        model(ids, position_ids=torch.arange(8)[None])
    with torch.no_grad(), recording_calls() as at_shift:
        model(ids, position_ids=torch.arange(8)[None] + shift)
    if len(at0) != plain.config.num_hidden_layers or len(at_shift) != len(at0):
        raise CheckFailed(f"{len(at0)} attention calls for {plain.config.num_hidden_layers} layers")
    candidates = [Rotation("none")] + [Rotation(layout, inv, name) for name, inv in buffers.items()
                                       for layout in ("half", "interleaved")]
    rules = []
    for layer, ((_, q0, k0, _), (_, q1, k1, _)) in enumerate(zip(at0, at_shift, strict=True)):
        for rot in candidates:
            if rot.inv_freq is not None and 2 * rot.inv_freq.numel() > k0.shape[-1]:
                continue
            delta = torch.full((1, 1, k0.shape[2]), shift)
            moved_k, moved_q = rotate(k0.float(), delta, rot), rotate(q0.float(), delta, rot)
            scale = max(1.0, k1.abs().max().item(), q1.abs().max().item())
            if ((moved_k - k1.float()).abs().max().item() <= _TOL * scale
                    and (moved_q - q1.float()).abs().max().item() <= _TOL * scale):
                rules.append(rot)
                break
        else:
            raise CheckFailed(f"layer {layer}: no rotary buffer and channel layout moves its keys and queries as the "
                              "model does")
    return rules


def _registry_reason(model: Any) -> str:
    return (f"{type(model).__name__}'s attention does not go through transformers' attention-function registry, so "
            "msrnn cannot evict inside it")


# --------------------------------------------------------------------------- verdicts, cached
_MEMORY: dict[str, Verdict] = {}
_VERIFYING: contextvars.ContextVar[bool] = contextvars.ContextVar("msrnn_verifying", default=False)


def _disk_path(key: str):
    from msrnn.io import cache_dir

    return cache_dir() / "verified" / f"{key}.json"


def _load_cached(key: str) -> Verdict | None:
    path = _disk_path(key)
    try:
        data = json.loads(path.read_text())
        verdict = Verdict(**data)
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.key == key else None


def _save_cached(verdict: Verdict) -> None:
    from msrnn.io import write_json

    try:
        write_json(_disk_path(verdict.key), verdict.to_json())
    except OSError as exc:  # a read-only cache folder costs a re-verification next time, nothing else
        log.debug("could not cache the verification verdict: %s", exc)


def verdict_for(model: Any, use_cache: bool = True) -> Verdict:
    """The verdict for ``model``'s class and config on the installed versions (computed once, then cached)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ModelLoadError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", type(model).__name__)
    refusals = named_refusals(model)
    base = _attn_base(model)
    try:
        tiny_cfg, mapping = twin_config(model.config)
    except Exception as exc:  # noqa: BLE001 - a config msrnn cannot shrink is reported as such
        tiny_cfg, mapping = None, []
        build_error = f"{type(exc).__name__}: {one_line(exc, 300)}"
    key, versions = _cache_key(model, tiny_cfg or model.config, base)
    if use_cache and key in _MEMORY:
        return _MEMORY[key]
    if use_cache and (cached := _load_cached(key)) is not None:
        _MEMORY[key] = cached
        return cached
    start = time.perf_counter()
    verdict = Verdict(model_type=model_type, ok=False, key=key, versions=versions)
    if refusals:
        verdict.reason = f"KV eviction cannot honour {'; '.join(refusals)}"
    elif tiny_cfg is None:
        verdict.reason = f"msrnn could not build a tiny twin of this {model_type} config to verify it ({build_error})"
    else:
        _verify_twin(model, tiny_cfg, mapping, base, verdict)
    verdict.seconds = round(time.perf_counter() - start, 3)
    _MEMORY[key] = verdict
    _save_cached(verdict)
    return verdict


def _verify_twin(model: Any, tiny_cfg: Any, mapping: list[int], base: str, verdict: Verdict) -> None:
    cls = type(model)
    state = torch.random.get_rng_state()
    try:
        tiny_cfg._attn_implementation = base
        plain = build_twin(cls, tiny_cfg)
    except Exception as exc:  # noqa: BLE001
        verdict.reason = (f"msrnn could not build a tiny twin of this {verdict.model_type} model to verify it "
                          f"({type(exc).__name__}: {one_line(exc, 300)})")
        return
    finally:
        torch.random.set_rng_state(state)
    twin = copy.deepcopy(plain)
    rng = torch.random.get_rng_state()
    token = _VERIFYING.set(True)
    try:
        _run_checks(plain, twin, base, verdict)
    except ModelLoadError as exc:
        verdict.reason = str(exc)
        verdict.checks.setdefault("registry", f"failed: {exc}")
        return
    except TwinError as exc:
        verdict.reason = str(exc)
        verdict.checks["twin"] = "failed: could not run"
        return
    except CheckFailed as exc:
        name = next((n for n, v in verdict.checks.items() if v.startswith("failed")), "a check")
        verdict.reason = (f"KV eviction is not verified on {verdict.model_type}: check '{name}' failed "
                          f"({_latent_hint(str(exc))})")
        return
    finally:
        _VERIFYING.reset(token)
        torch.random.set_rng_state(rng)
    verdict.ok = True
    try:
        rules = _rolling_rules(plain, base)
    except CheckFailed as exc:
        verdict.rolling_reason = f"check 'rolling' failed on {verdict.model_type}: {exc}"
        verdict.checks["rolling"] = f"failed: {exc}"
        return
    except Exception as exc:  # noqa: BLE001
        verdict.rolling_reason = f"check 'rolling' failed on {verdict.model_type}: {type(exc).__name__}: {exc}"
        verdict.checks["rolling"] = f"failed: {type(exc).__name__}"
        return
    user_layers = _layer_count(model.config) or len(rules)
    distinct = {(r.layout, r.source) for r in rules}
    if user_layers > len(rules) and len(distinct) > 1 and not _per_layer_lists(model.config, user_layers):
        # Layers rotate differently, but no per-layer config list says which of the user's layers is which.
        verdict.rolling_reason = (f"check 'rolling' on {verdict.model_type}: layers rotate differently and no "
                                  "per-layer config setting tells msrnn which of the model's layers is which")
        verdict.checks["rolling"] = "failed: unmapped per-layer rotations"
        return
    verdict.rolling = [{"layout": rules[j].layout, "source": rules[j].source} for j in mapping]
    verdict.checks["rolling"] = "ok (" + ", ".join(sorted({f"{r.layout}" + (f" {r.source}" if r.source else "")
                                                            for r in rules})) + ")"


def _latent_hint(message: str) -> str:
    if "used without msrnn's attention function" in message or "did not receive the keys" in message:
        return ("the layer's attention does not attend the keys it caches, as with DeepSeek's multi-head latent "
                "attention, which caches compressed latents")
    return message


def check_supported(model: Any) -> None:
    """Raise a clear error for models that have no decoder KV cache to bound, or whose attention has a feature
    eviction cannot honour (named: a sliding window, a softcap, chunked attention, ALiBi). Cheap: reads the config;
    :func:`msrnn.kv.prepare_model` then verifies the rest on a tiny twin (:func:`verdict_for`)."""
    from transformers import PreTrainedModel

    from msrnn.models.loading import is_encoder_only

    if not isinstance(model, PreTrainedModel):
        raise ModelLoadError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ModelLoadError(f"{cfg.model_type} is an encoder-decoder model; KV eviction supports decoder-only LMs")
    if is_encoder_only(cfg):
        raise ModelLoadError(f"{cfg.model_type} is an encoder-only model with no KV cache; use a decoder LM "
                             "such as Llama, Mistral, Qwen2 or GPT-2")
    if not isinstance(getattr(cfg, "num_hidden_layers", None), int):
        raise ModelLoadError(f"{type(model).__name__}'s config has no num_hidden_layers, so msrnn cannot give each "
                             "layer a bounded cache")
    reasons = named_refusals(model)
    if reasons:
        raise ModelLoadError(f"{type(model).__name__}: KV eviction cannot honour {'; '.join(reasons)}")


def require_verified(model: Any) -> Verdict | None:
    """Raise :class:`ModelLoadError` naming the failed check or feature unless ``model`` is verified (None while
    verification itself builds bounded models of its twin)."""
    if _VERIFYING.get():
        return None
    verdict = verdict_for(model)
    if not verdict.ok:
        raise ModelLoadError(f"{type(model).__name__}: {verdict.reason}")
    return verdict


def rolling_rotations(model: Any) -> list[Rotation]:
    """Per layer of ``model``, the rotation ``positions='rolling'`` re-rotates with (its own buffers), verified."""
    from msrnn.errors import ConfigError

    if _VERIFYING.get():
        raise ConfigError("rolling positions are verified separately, not inside the checks")
    verdict = require_verified(model)
    if verdict.rolling is None:
        raise ConfigError(f"positions='rolling' is refused for {verdict.model_type}: "
                          f"{verdict.rolling_reason or 'not verified'}; use positions='original'")
    buffers = rotary_buffers(model)
    rules = []
    for rule in verdict.rolling:
        if rule["layout"] == "none":
            rules.append(Rotation("none"))
        elif rule["source"] in buffers:
            rules.append(Rotation(rule["layout"], buffers[rule["source"]], rule["source"]))
        else:
            raise ConfigError(f"positions='rolling': the model has no buffer {rule['source']}")
    if len(rules) != model.config.num_hidden_layers:
        raise ConfigError(f"positions='rolling': {len(rules)} rotations for {model.config.num_hidden_layers} layers")
    return rules


# --------------------------------------------------------------------------- every architecture transformers ships
@dataclass
class ArchitectureResult:
    """One decoder type of the installed transformers: verified, refused (with the named reason), or not built."""

    model_type: str
    model_class: str
    outcome: str  # "verified" | "refused" | "not built"
    reason: str = ""
    rolling: str = ""  # "yes (layouts)" or why rolling positions are refused
    seconds: float = 0.0


_MAX_TWIN_PARAMS = 20_000_000  # a twin is a few hundred thousand parameters; more means a size field was missed


def build_twin(cls: type, tiny_cfg: Any) -> Any:
    """``cls(tiny_cfg)`` in fp32, after sizing it on the meta device (a config field msrnn does not shrink could
    otherwise ask for gigabytes)."""
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in cls(tiny_cfg).parameters())
    except Exception:  # noqa: BLE001 - some models cannot be built on meta; the real build reports its own error
        params = 0
    if params > _MAX_TWIN_PARAMS:
        raise TwinError(f"its tiny twin would still have {params / 1e6:.0f}M parameters (a size setting msrnn does "
                        "not know how to shrink)")
    torch.manual_seed(0)
    return cls(tiny_cfg).float().eval()


def tiny_of_config(config: Any) -> Any:
    """A tiny random model of the causal-LM class transformers maps ``config`` to, shrunk as a twin would be."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise ModelLoadError(f"transformers has no causal-LM class for model type {config.model_type!r}")
    tiny, _ = twin_config(config)
    return build_twin(cls, tiny)


def tiny_of_type(model_type: str) -> Any:
    """A tiny random causal LM of ``model_type`` built from its default config."""
    from transformers import AutoConfig

    return tiny_of_config(AutoConfig.for_model(model_type))


def causal_lm_types() -> list[str]:
    """Every model type the installed transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_architecture(model_type: str) -> ArchitectureResult:
    """Build a tiny ``model_type`` and ask :func:`msrnn.kv.prepare_model`'s questions of it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    start = time.perf_counter()
    cls_name = str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "?"))
    try:
        model = tiny_of_type(model_type)
    except Exception as exc:  # noqa: BLE001 - a config that cannot be built tiny is reported, not verified
        why = f"{type(exc).__name__}: {one_line(exc, 140)}"
        return ArchitectureResult(model_type, cls_name, "not built", why, seconds=round(time.perf_counter() - start, 2))
    try:
        check_supported(model)
        verdict = verdict_for(model)
    except ModelLoadError as exc:
        return ArchitectureResult(model_type, type(model).__name__, "refused", one_line(exc, 300),
                                  seconds=round(time.perf_counter() - start, 2))
    if not verdict.ok:
        return ArchitectureResult(model_type, type(model).__name__, "refused", verdict.reason or "",
                                  seconds=round(time.perf_counter() - start, 2))
    rolling = ("yes (" + ", ".join(sorted({r["layout"] for r in verdict.rolling})) + ")" if verdict.rolling
               else f"no: {verdict.rolling_reason}")
    return ArchitectureResult(model_type, type(model).__name__, "verified", rolling=rolling,
                              seconds=round(time.perf_counter() - start, 2))
