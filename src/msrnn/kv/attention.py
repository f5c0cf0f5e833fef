"""msrnn's attention functions for bounded KV caches, registered in transformers' ``AttentionInterface``.

``msrnn_sdpa`` and ``msrnn_eager`` behave exactly like ``sdpa``/``eager`` unless the layer being computed belongs
to a :class:`~msrnn.kv.cache.KVEvictionCache`. For those layers they

1. build the attention mask from the cache's own bookkeeping (transformers' padding mask assumes the cached
   slots are contiguous in the original positions, which is false after eviction),
2. get the attention scores a policy needs -- from eager's weights, or by computing the newest query's row
   (one row per head: cheap) when SDPA returns none,
3. evict down to the budget and commit the kept slots to the cache layer.

Prefill modes. ``oneshot`` attends all new tokens to every slot, then evicts once with the last query's
scores (TOVA's official prefill). ``exact`` processes the chunk's queries one after another inside the
attention call, evicting after each, which equals feeding the tokens one at a time through the whole model:
attention is the only operation that mixes tokens, so doing it sequentially per layer is enough.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from msrnn.errors import MsrnnError
from msrnn.kv.cache import ACTIVE_LAYER, EvictionLayer, SlotTable
from msrnn.kv.rope import rotate

_REGISTERED = False

# Keyword arguments a model may pass its attention function that change the attention itself. msrnn's eviction
# path computes the attention from q and k, so each one must be honoured there or refused, never dropped.
# ``s_aux`` (per-head attention-sink logits, gpt-oss) is honoured; the others are refused when they are set.
HONOURED_RULES = ("s_aux",)
REFUSED_RULES = {
    "sliding_window": "a sliding window",
    "softcap": "an attention logit softcap",
    "position_bias": "an additive position bias (ALiBi or relative position buckets)",
    "attention_chunk_size": "chunked attention",
}

# Calls seen by msrnn's attention functions while verification records them (msrnn.kv.verify): (module, query,
# key, names of the keyword arguments that were set). None when nothing records.
_RECORDER: contextvars.ContextVar[list[tuple[Any, torch.Tensor, torch.Tensor, tuple[str, ...]]] | None] = \
    contextvars.ContextVar("msrnn_attention_recorder", default=None)


@contextlib.contextmanager
def recording_calls() -> Iterator[list[tuple[Any, torch.Tensor, torch.Tensor, tuple[str, ...]]]]:
    """Record every call of msrnn's attention functions in this block (verification uses it to see which layers
    attend through the registry, what rules they pass, and the queries and keys each one attends with)."""
    calls: list[tuple[Any, torch.Tensor, torch.Tensor, tuple[str, ...]]] = []
    token = _RECORDER.set(calls)
    try:
        yield calls
    finally:
        _RECORDER.reset(token)


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _group(p: torch.Tensor, groups: int, reduce: str) -> torch.Tensor:
    """[B, Hq, N] -> [B, G, N]: mean or sum over all query heads (G=1) or over each KV head's group."""
    B, Hq, N = p.shape
    g = p.view(B, groups, Hq // groups, N)  # [B, G, Hq/G, N]
    return g.mean(2) if reduce == "mean" else g.sum(2)


def _probs(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scaling: float,
           sink: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities in fp32: q [B, Hq, t, D], k [B, Hkv, N, D], allowed [B, 1|Hq, t, N].

    GQA is handled by grouping query heads onto their KV head (a broadcast matmul), not by copying keys.
    ``sink`` [Hq]: per-head attention-sink logits (gpt-oss's ``s_aux``), a column every query also attends to
    whose probability is then dropped, so a row sums to less than one.
    """
    B, Hq, t, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    qg = (q.float() * scaling).reshape(B, Hkv, (Hq // Hkv) * t, D)  # [B, Hkv, rep*t, D]: heads grouped per KV head
    logits = torch.matmul(qg, k.float().transpose(-1, -2)).view(B, Hq, t, N)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return _softmax(logits, None if sink is None else sink.view(1, Hq, 1, 1))


def _softmax(logits: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension; ``sink`` (broadcastable to ``logits[..., :1]``) is an attention-sink logit
    taken into the normaliser and dropped from the result."""
    if sink is None:
        return logits.softmax(-1)
    col = sink.float().expand(*logits.shape[:-1], 1)
    return torch.cat([logits, col], dim=-1).softmax(-1)[..., :-1]


def generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, s_aux=None, **kwargs):
    """Plain softmax attention returning weights (with ``s_aux`` attention sinks), for models whose modeling
    module has no ``eager_attention_forward`` of its own."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    k, v = _repeat_heads(key, n_rep), _repeat_heads(value, n_rep)
    w = torch.matmul(query, k.transpose(2, 3)).float() * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask, torch.finfo(torch.float32).min)
        else:
            w = w + attention_mask.float()
    w = _softmax(w, None if s_aux is None else s_aux.view(1, -1, 1, 1)).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _passthrough(name: str, module: Any, kwargs: dict[str, Any]):
    """The function ``msrnn_<name>`` stands in for where nothing is evicted: for ``eager``, the model's own
    ``eager_attention_forward`` (which knows its rules, e.g. gpt-oss's sinks) when its modeling module has one."""
    if name == "eager":
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if callable(own):
            return own
    return _base(name, kwargs)


def _base(name: str, kwargs: dict[str, Any] | None = None):
    """The attention msrnn's eviction path calls with its own boolean masks: msrnn's eager function (weights, sinks),
    or transformers' SDPA unless the call carries sinks, which SDPA would drop."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager" or (kwargs and kwargs.get("s_aux") is not None):
        return generic_eager
    return ALL_ATTENTION_FUNCTIONS[name]


def _new_validity(mask: torch.Tensor | None, B: int, T: int, S0: int, device) -> torch.Tensor:
    """[B, T] bool: which new tokens are real (not padding).

    Read off the last query's mask row: with left padding the last token is always real and sees every real
    earlier token. (A pad query's own row is useless: transformers un-masks fully masked rows for SDPA.)
    Right padding is not supported, as in transformers' own generation.
    """
    if mask is None or mask.dim() != 4:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, S0 : S0 + T]  # [B or 1, T]
    ok = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return ok.expand(B, T).to(device)


@dataclass
class AttentionCall:
    """One call of msrnn's attention function for a bounded layer: what transformers passed, and the name of the
    attention it stands for (``sdpa`` or ``eager``)."""

    base_name: str
    module: Any
    query: torch.Tensor  # [B, Hq, T, D]
    key: torch.Tensor  # [B, Hkv, S, D]: the layer's kept slots, then the T new tokens
    value: torch.Tensor  # [B, Hkv, S, Dv]
    mask: torch.Tensor | None
    scaling: float
    dropout: float
    kwargs: dict[str, Any]

    @property
    def sink(self) -> torch.Tensor | None:
        """Per-head attention sink logits (``s_aux``), which every softmax here includes."""
        return self.kwargs.get("s_aux")

    def base(self, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base attention over ``key``/``self.value`` with msrnn's own boolean mask ``allowed``."""
        return _base(self.base_name, self.kwargs)(self.module, query, key, self.value, allowed, scaling=self.scaling,
                                                  dropout=self.dropout, **self.kwargs)


def evicting_attention(base_name: str):
    """msrnn's attention function wrapping transformers' ``name`` one (registry entry)."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if not torch.compiler.is_compiling():
            calls = _RECORDER.get()
            if calls is not None:
                calls.append((module, query.detach(), key.detach(),
                              tuple(sorted(k for k, v in kwargs.items() if v is not None))))
        layer = ACTIVE_LAYER.get()
        if layer is None or layer.pending is None or layer.pending[0] is not key:
            if ACTIVE_LAYER.consumed(key):
                raise MsrnnError(f"{type(module).__name__} calls the attention function more than once per layer "
                                 "(as DiffLlama's differential attention does); KV eviction evicts in one call, so "
                                 "the other calls would attend the unevicted cache: use a model without it")
            return _passthrough(base_name, module, kwargs)(module, query, key, value, attention_mask,
                                                           scaling=scaling, dropout=dropout, **kwargs)
        ACTIVE_LAYER.set(None)
        ACTIVE_LAYER.mark_consumed(key)
        for rule, what in REFUSED_RULES.items():  # a per-layer rule the config check could not see
            if kwargs.get(rule) is not None:
                raise MsrnnError(f"{type(module).__name__} asks for attention with {what} ({rule}), which KV "
                                 "eviction does not apply; use a model without it")
        scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        return _attend_and_evict(layer, AttentionCall(base_name, module, query, key, value, attention_mask, scaling,
                                                      dropout, kwargs))

    attention.__name__ = f"msrnn_{base_name}"
    return attention


def _attend_and_evict(layer: EvictionLayer, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    if layer.free is not None:
        return _decode_in_place(layer, call)
    B, Hq, T, _ = call.query.shape
    S = call.key.shape[2]
    S0 = S - T
    dev = call.query.device
    policy = layer.policy
    new_valid = _new_validity(call.mask, B, T, S0, dev)  # [B, T]
    layer.all_valid = layer.all_valid and bool(new_valid.all())
    if T == 1 and layer.all_valid:
        new_pos = layer.counter[:, None]  # the common decode step: one real token
    else:
        new_pos = torch.where(new_valid, layer.counter[:, None] + new_valid.long().cumsum(1) - 1, -1)  # [B, T]
    table = layer.slots.append(new_pos.expand(B, T), new_valid)  # [B, G, S]: the kept slots and the new tokens
    k = policy.budget
    # One new token: "exact" and "oneshot" coincide, and the one-shot path avoids the per-query gathers.
    carried = None  # exact: the token-by-token state never exceeds the budget
    if k is None or S <= k or layer.prefill == "oneshot" or T == 1:
        out, weights, keep = _oneshot(layer, call, table, S0)
        if keep is not None and T > 1:
            carried = S - 1  # one eviction at the end: the chunk's tokens pile up on the kept slots until then
    elif layer.prefill_chunk is not None:
        out, keep, carried = _chunked(layer, call, table, S0, layer.prefill_chunk)
        weights = None
    elif layer.ref or layer.rolling or S0 > k:
        out, keep = _exact_ref(layer, call, table, S0)
        weights = None
    else:
        out, keep = _exact(layer, call, table, S0)
        weights = None
    layer.commit(keep, table, T, new_valid.long().sum(1) if not layer.all_valid else T, carried)
    return out, weights


def _decode_in_place(layer: EvictionLayer, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step on a fixed buffer: the new token is already written into the free slot, so the query attends
    all budget + 1 slots (all in its past), the policy scores them, and the lowest-scoring slot becomes the free
    one. The same rule as the naive step, which keeps the top ``budget``: one slot goes, the older one on ties
    (slots are not chronological here, so ties are broken by original position). Padding slots of a left-padded
    prompt are masked and scored -inf, so they go first, as in the naive layout."""
    query, key, value, table = call.query, call.key, call.value, layer.slots
    B = query.shape[0]
    if call.mask is not None:
        real = _new_validity(call.mask, B, 1, key.shape[2] - 1, query.device).all()
        message = "a padding token arrived while decoding in place; only left padding is supported"
        if torch.compiler.is_compiling():  # no host sync inside a captured step: raised when the step runs
            torch._assert_async(real, message)
        elif not bool(real):
            raise MsrnnError(message)
    G = table.groups
    Hq = query.shape[1]
    policy = layer.policy
    p = None
    allowed_q = None  # every slot real: no mask (the common case)
    if not layer.all_valid:  # padding slots from a left-padded prompt: masked until they are evicted
        allowed = table.valid[:, :, None, :]  # [B, G, 1, S]
        allowed_q = allowed if G == 1 else _repeat_heads(allowed, Hq // G)
    if policy.needs == "none" or call.base_name == "eager" or call.module.training:
        out, weights = call.base(query, key, allowed_q)
        if policy.needs != "none":
            p = weights[:, :, -1].float()
    else:
        # The policy needs the query's probabilities, which SDPA does not return: compute them once in fp32 and
        # attend with them, rather than running SDPA and then recomputing the same row (one q.K instead of two).
        Hkv = key.shape[1]
        p = _probs(query, key, allowed_q, call.scaling, call.sink)[:, :, 0]  # [B, Hq, S]
        pv = torch.matmul(p.view(B, Hkv, Hq // Hkv, -1), value.float())  # [B, Hkv, Hq/Hkv, Dv]
        out = pv.view(B, Hq, 1, -1).transpose(1, 2).to(query.dtype)  # [B, 1, Hq, Dv]
        weights = None
    if table.acc is not None:
        table.acc += _group(p, G, "sum")
    last = _group(p, G, "mean") if policy.needs == "last" else None
    scores = policy.score(table.candidates(last))  # [B, G, k + 1]
    if not layer.all_valid:
        scores = scores.masked_fill(~table.valid, float("-inf"))
    lowest = scores == scores.min(dim=-1, keepdim=True).values
    evict = table.positions.masked_fill(~lowest, torch.iinfo(torch.long).max).argmin(dim=-1)  # [B, G] oldest
    layer.commit_in_place(evict)
    return out, weights


def _rolling_deltas(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rotation that moves each slot from its original position to its position inside the cache."""
    cache_pos = valid.long().cumsum(-1) - 1
    return torch.where(valid, cache_pos - positions, 0)


def _select(policy: Any, cand: SlotTable, last: torch.Tensor | None, k: int, all_valid: bool = False
            ) -> torch.Tensor:
    """[B, G, k] indices of the ``k`` candidates the policy scores highest, ascending."""
    scores = policy.score(cand.candidates(last))
    if not all_valid:
        scores = scores.masked_fill(~cand.valid, float("-inf"))
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values  # chronological order, as TOVA's code keeps it


def _oneshot(layer: EvictionLayer, call: AttentionCall, table: SlotTable, S0: int
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    query, key, scaling, sink = call.query, call.key, call.scaling, call.sink
    B, Hq, T, _ = query.shape
    S = key.shape[2]
    G = table.groups
    valid, acc = table.valid, table.acc
    dev = query.device
    # allowed[b, g, i, s]: kept slots are all in the past; new tokens are causal among themselves, padding is
    # visible only to itself (so no query row is empty).
    # A prompt's first chunk (no kept slot, no padding) is plain causal attention: SDPA's causal kernel, no [T, S]
    # mask (which forces SDPA's slow math path). ``ref`` keeps the explicit mask as the readable twin.
    causal = T > 1 and S0 == 0 and layer.all_valid and not layer.ref and call.base_name == "sdpa" and sink is None
    if (T == 1 and layer.all_valid) or causal:
        allowed_q = None  # one query, every slot real and in its past (the common decode step), or causal
    else:
        tri = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        new_ok = tri & valid[:, :, None, S0:] | torch.eye(T, dtype=torch.bool, device=dev)  # [B, G, T, T]
        old_ok = valid[:, :, None, :S0].expand(B, G, T, S0)
        allowed = torch.cat([old_ok, new_ok], dim=-1)  # [B, G, T, S]
        allowed_q = allowed if G == 1 else _repeat_heads(allowed, Hq // G)  # [B, 1|Hq, T, S]
    q, kk = query, key
    if layer.rolling:
        delta = _rolling_deltas(table.positions, valid)  # [B, 1, S]
        kk = rotate(key, delta, layer.rotation)
        q = rotate(query, delta[:, :, S0:], layer.rotation)
    policy, k = layer.policy, layer.policy.budget
    if acc is not None and call.base_name == "sdpa" and not layer.ref and not call.module.training:
        # H2O needs every query's probabilities (their column sums), which SDPA does not return: compute them once
        # per query block in fp32 and attend with them, instead of attending with SDPA and computing them again.
        out, colsum = _attend_with_probs(q, kk, call.value, allowed_q, causal, S0, scaling, sink)
        weights = None
        acc += _group(colsum, G, "sum")
    else:
        out, weights = call.base(q, kk, allowed_q)
        if acc is not None:  # the readable twin (and eager, whose weights are at hand)
            colsum = torch.zeros(B, Hq, S, device=dev)
            for lo in range(0, T, 256):  # bounded memory for long prefills
                if causal:  # the rows' causal mask, built for this block only: [1, 1, n, S]
                    rows = torch.arange(lo, min(T, lo + 256), device=dev)
                    block = (torch.arange(S, device=dev)[None] <= rows[:, None])[None, None]
                else:
                    block = None if allowed_q is None else allowed_q[:, :, lo : lo + 256]
                p = weights[:, :, lo : lo + 256].float() if weights is not None else \
                    _probs(q[:, :, lo : lo + 256], kk, block, scaling, sink)
                colsum += p.sum(2)
            acc += _group(colsum, G, "sum")
    if k is None or S <= k:
        return out, weights, None  # nothing to evict: the layer keeps every slot without copying
    last = None
    if policy.needs == "last":
        p = weights[:, :, -1].float() if weights is not None else \
            _probs(q[:, :, -1:], kk, None if allowed_q is None else allowed_q[:, :, -1:], scaling, sink)[:, :, 0]
        last = _group(p, G, "mean")
    keep = _select(policy, table, last, k, all_valid=layer.all_valid)
    return out, weights, keep


def _attend_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                       causal: bool, S0: int, scaling: float, sink: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, T, Hq, Dv] and the probabilities' column sums [B, Hq, S], from one fp32 pass over
    blocks of ``_QUERY_BLOCK`` queries (the fast twin of SDPA followed by :func:`_probs` in ``_oneshot``).

    q [B, Hq, T, D] are the chunk's queries, k/v [B, Hkv, S, D] the S0 kept slots then the T new tokens, ``allowed``
    [B, 1|Hq, T, S] or None (every slot visible), ``causal`` a first chunk with no mask (new tokens causal among
    themselves). Queries lo..hi-1 see no column past S0 + hi - 1 (later new tokens are their future), so a block's
    logits are computed against the first S0 + hi columns only: half the work of a full [T, S] pass when causal."""
    B, Hq, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = Hq // Hkv
    dev = q.device
    colsum = torch.zeros(B, Hq, S, device=dev)
    out = torch.empty(B, Hq, T, Dv, device=dev)
    kf, vf = k.float(), v.float()
    sink_h = None if sink is None else sink.view(1, Hq, 1, 1)
    future = torch.ones(_QUERY_BLOCK, _QUERY_BLOCK, dtype=torch.bool, device=dev).triu(1)  # [n, n] above the diagonal
    for lo in range(0, T, _QUERY_BLOCK):
        hi = min(T, lo + _QUERY_BLOCK)
        n, cols = hi - lo, S0 + hi
        qg = (q[:, :, lo:hi].float() * scaling).reshape(B, Hkv, rep * n, D)  # [B, Hkv, rep*n, D]: heads per KV head
        logits = torch.matmul(qg, kf[:, :, :cols].transpose(-1, -2)).view(B, Hq, n, cols)
        if causal:  # only the block's own square has future columns: mask it in place (no [n, cols] mask)
            logits[..., S0 + lo :].masked_fill_(future[:n, :n], float("-inf"))
        elif allowed is not None:
            logits.masked_fill_(~allowed[:, :, lo:hi, :cols], float("-inf"))
        p = _softmax(logits, sink_h)  # [B, Hq, n, cols]
        colsum[:, :, :cols] += p.sum(2)
        pv = torch.matmul(p.reshape(B, Hkv, rep * n, cols), vf[:, :, :cols])  # [B, Hkv, rep*n, Dv]
        out[:, :, lo:hi] = pv.view(B, Hq, n, Dv)
    return out.transpose(1, 2).to(q.dtype).contiguous(), colsum  # [B, T, Hq, Dv]


def _exact_ref(layer: EvictionLayer, call: AttentionCall, table: SlotTable, S0: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token semantics inside one call: query j sees the slots kept after token j - 1 (readable twin)."""
    query, key, value, scaling, sink = call.query, call.key, call.value, call.scaling, call.sink
    B, Hq, T, D = query.shape
    Hkv, Dv = key.shape[1], value.shape[-1]
    G = table.groups
    acc = table.acc
    n_rep = Hq // Hkv
    policy, k = layer.policy, layer.policy.budget
    cur = torch.arange(S0, device=query.device).expand(B, G, S0)  # [B, G, n] indices into the S slots
    outs = []
    for j in range(T):
        cand = torch.cat([cur, cur.new_full((B, G, 1), S0 + j)], dim=2)  # [B, G, n+1]
        kidx = cand if G == Hkv else cand.expand(B, Hkv, cand.shape[-1])
        kc = key.gather(2, kidx[..., None].expand(-1, -1, -1, D))  # [B, Hkv, n+1, D]
        vc = value.gather(2, kidx[..., None].expand(-1, -1, -1, Dv))
        ctable = table.gather(cand)  # the candidates' bookkeeping (before this query's attention is added)
        cvalid = ctable.valid
        allowed = cvalid.clone()
        allowed[..., -1] = True
        qj = query[:, :, j : j + 1]
        if layer.rolling:
            delta = _rolling_deltas(ctable.positions, cvalid)
            kc = rotate(kc, delta, layer.rotation)
            qj = rotate(qj, delta[:, :, -1:], layer.rotation)
        allowed_q = allowed[:, :, None] if G == 1 else _repeat_heads(allowed[:, :, None], n_rep)
        p = _probs(qj, kc, allowed_q, scaling, sink)  # [B, Hq, 1, n+1]
        outs.append(torch.matmul(p, _repeat_heads(vc, n_rep).float()))  # [B, Hq, 1, Dv]
        if acc is not None:
            acc.scatter_add_(2, cand, _group(p[:, :, 0], G, "sum"))
        if cand.shape[-1] > k:
            last = _group(p[:, :, 0], G, "mean") if policy.needs == "last" else None
            sel = _select(policy, table.gather(cand), last, k)  # with this query's attention in the H2O sums
            cur = cand.gather(2, sel)
        else:
            cur = cand
    out = torch.cat(outs, dim=2).to(query.dtype).transpose(1, 2).contiguous()  # [B, T, Hq, Dv]
    return out, cur


def _chunked(layer: EvictionLayer, call: AttentionCall, table: SlotTable, S0: int, c: int
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``chunked:c``: groups of c queries see the slots kept after the previous group; one eviction per group."""
    query, key, value, scaling, sink = call.query, call.key, call.value, call.scaling, call.sink
    B, Hq, T, D = query.shape
    Hkv, Dv = key.shape[1], value.shape[-1]
    G = table.groups
    acc = table.acc
    n_rep = Hq // Hkv
    policy, k = layer.policy, layer.policy.budget
    dev = query.device
    cur = torch.arange(S0, device=dev).expand(B, G, S0)  # [B, G, n] indices into the S slots
    outs, carried = [], S0
    for lo in range(0, T, c):
        n = min(c, T - lo)
        new = torch.arange(S0 + lo, S0 + lo + n, device=dev).expand(B, G, n)
        cand = torch.cat([cur, new], dim=2)  # [B, G, m]
        m = cand.shape[-1]
        kidx = cand if G == Hkv else cand.expand(B, Hkv, m)
        kc = key.gather(2, kidx[..., None].expand(-1, -1, -1, D))  # [B, Hkv, m, D]
        vc = value.gather(2, kidx[..., None].expand(-1, -1, -1, Dv))
        cvalid = table.valid.gather(2, cand)  # [B, G, m]
        tri = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        new_ok = tri & cvalid[:, :, None, m - n :] | torch.eye(n, dtype=torch.bool, device=dev)  # [B, G, n, n]
        allowed = torch.cat([cvalid[:, :, None, : m - n].expand(B, G, n, m - n), new_ok], dim=-1)  # [B, G, n, m]
        qj = query[:, :, lo : lo + n]
        if layer.rolling:
            delta = _rolling_deltas(table.positions.gather(2, cand), cvalid)
            kc = rotate(kc, delta, layer.rotation)
            qj = rotate(qj, delta[:, :, m - n :], layer.rotation)
        p = _probs(qj, kc, allowed if G == 1 else _repeat_heads(allowed, n_rep), scaling, sink)  # [B, Hq, n, m]
        outs.append(torch.matmul(p, _repeat_heads(vc, n_rep).float()))  # [B, Hq, n, Dv]
        if acc is not None:
            acc.scatter_add_(2, cand, _group(p.sum(2), G, "sum"))
        if m > k:
            last = _group(p.mean(2), G, "mean") if policy.needs == "last" else None
            cur = cand.gather(2, _select(policy, table.gather(cand), last, k))
            carried = max(carried, m - 1 if n > 1 else k)  # the group's tokens pile up until its eviction
        else:
            cur = cand
            carried = max(carried, m)
    out = torch.cat(outs, dim=2).to(query.dtype).transpose(1, 2).contiguous()  # [B, T, Hq, Dv]
    return out, cur, carried


_QUERY_BLOCK = 256  # queries whose logits are computed at once: bounds memory at B * Hq * 256 * S floats


def _exact(layer: EvictionLayer, call: AttentionCall, table: SlotTable, S0: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same semantics as :func:`_exact_ref`, a block of queries at a time over a compact candidate set.

    Needs S0 <= k (a layer never holds more than its budget between calls), so once the candidates reach k + 1
    every query evicts exactly one slot: the lowest-scoring member, the older one on ties (``argmin`` returns
    the first index). A block of queries can only attend the slots alive when it starts plus its own new tokens, so
    its logits are computed against those m <= k + block columns (gathered once per block), not all S slots; inside
    the block, slots not (or no longer) members get -inf logits, which gives them probability 0, so the softmax
    equals the reference's softmax over its gathered candidates.
    """
    query, key, value, scaling, sink = call.query, call.key, call.value, call.scaling, call.sink
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = table.groups
    valid, acc = table.valid, table.acc
    policy, k = layer.policy, layer.policy.budget
    dev = query.device
    neg = float("-inf")
    alive = torch.zeros(B, G, S, dtype=torch.bool, device=dev)  # [B, G, S] slots the next query may see
    alive[:, :, :S0] = True
    bias = torch.zeros(B, G, S, device=dev).masked_fill(~valid, neg)  # [B, G, S] 0 = attend, -inf = masked
    bias[:, :, S0:] = neg  # future tokens: not yet members
    kf, vf = key.float(), value.float()
    Dv = vf.shape[-1]
    slot = torch.arange(S, device=dev)
    sink_g = None if sink is None else sink.float().view(1, G, Hq // G, 1)  # the logits' head order
    outs = []
    for lo in range(0, T, _QUERY_BLOCK):
        hi = min(T, lo + _QUERY_BLOCK)
        n = hi - lo
        c = min(S0 + lo, k)  # members when the block starts: the same count for every row and group
        old = slot.expand(B, G, S)[alive].view(B, G, c)  # [B, G, c] ascending (chronological) slot indices
        cand = torch.cat([old, torch.arange(S0 + lo, S0 + hi, device=dev).expand(B, G, n)], dim=2)  # [B, G, m]
        m = c + n
        kidx = cand if G == Hkv else cand.expand(B, Hkv, m)  # [B, Hkv, m]
        kc = kf.gather(2, kidx[..., None].expand(-1, -1, -1, D))  # [B, Hkv, m, D]
        vc = vf.gather(2, kidx[..., None].expand(-1, -1, -1, Dv))  # [B, Hkv, m, Dv]
        alive_c, bias_c = alive.gather(2, cand), bias.gather(2, cand)  # [B, G, m]
        cand_table = table.gather(cand)  # [B, G, m] the candidates' positions, validity and H2O sums
        valid_c, acc_c = cand_table.valid, cand_table.acc
        qg = (query[:, :, lo:hi].float() * scaling).reshape(B, Hkv, (Hq // Hkv) * n, D)  # [B, Hkv, rep*n, D]
        logits = torch.matmul(qg, kc.transpose(-1, -2)).view(B, Hkv, Hq // Hkv, n, m)
        logits = logits.view(B, Hq, n, m).permute(2, 0, 1, 3).reshape(n, B, G, Hq // G, m)  # [n, B, G, Hq/G, m]
        probs = torch.empty(n, B, G, Hq // G, m, device=dev)
        for i in range(n):
            s = c + i  # the newest token's column: always visible to its own query (even padding)
            alive_c[:, :, s] = True
            bias_c[:, :, s] = 0.0
            p = _softmax(logits[i] + bias_c[:, :, None], sink_g)  # [B, G, Hq/G, m]
            probs[i] = p
            if acc_c is not None:
                acc_c += p.sum(2)
            if not valid_c[:, :, s].all():
                bias_c[:, :, s] = bias_c[:, :, s].masked_fill(~valid_c[:, :, s], neg)
            if S0 + lo + i + 1 > k:  # k + 1 members: evict one
                last = p.mean(2) if policy.needs == "last" else None
                scores = policy.score(cand_table.candidates(last, member=alive_c))
                scores = scores.masked_fill(~valid_c, neg).masked_fill(~alive_c, float("inf"))
                out_idx = scores.argmin(-1, keepdim=True)  # [B, G, 1]
                alive_c.scatter_(2, out_idx, False)
                bias_c.scatter_(2, out_idx, neg)
        alive.scatter_(2, cand, alive_c)  # the block's membership, H2O sums and masks back onto the S slots
        bias.scatter_(2, cand, bias_c)
        if acc is not None:
            acc.scatter_(2, cand, acc_c)
        # [n, B, G, Hq/G, m] -> [B, Hkv, rep*n, m] in the logits' head order, then one matmul with the values
        p = probs.reshape(n, B, Hq, m).permute(1, 2, 0, 3).reshape(B, Hkv, (Hq // Hkv) * n, m)
        outs.append(torch.matmul(p, vc).view(B, Hq, n, -1))  # [B, Hq, n, Dv]
    out = torch.cat(outs, dim=2).to(query.dtype).transpose(1, 2).contiguous()  # [B, T, Hq, Dv]
    keep = slot.expand(B, G, S)[alive].view(B, G, k)  # ascending slot indices
    return out, keep


def register() -> None:
    """Add ``msrnn_sdpa`` and ``msrnn_eager`` to transformers' attention registry (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register("msrnn_sdpa", evicting_attention("sdpa"))
    AttentionInterface.register("msrnn_eager", evicting_attention("eager"))
    # Masks are built per implementation name; ours take the same masks as their base implementations.
    AttentionMaskInterface.register("msrnn_sdpa", sdpa_mask)
    AttentionMaskInterface.register("msrnn_eager", eager_mask)
    _REGISTERED = True
