"""Decayed linear attention, the recurrence inside SUPRA (Mercat et al., 2024, "Linearizing Large Language Models").

    S_t = gamma_h * S_{t-1} + k_t^T v_t          state [B, H, Dk, Dv], fp32
    o_t = q_t S_t

Three forms of the same function, tested against each other (outputs, final state, gradients):

* :func:`chunked_ref` -- the readable reference: a loop over tokens;
* :func:`chunked` -- the training workhorse on CPU, O(T*C*D + (T/C)*D^2): exact attention inside chunks of C
  tokens, the state carries everything before the chunk;
* :func:`recurrent_step` -- one token, for decoding.

Every form takes and returns a carried state, so long streams can be processed chunk by chunk. ``resets`` [B, T]
(bool) marks where a new document starts inside the input (training on packed documents): the state is emptied
before that token, i.e. gamma is 0 there, so no document reads another's tokens. The state is
stored *after* the decay of the step that produced it (fla's convention); SUPRA's official recurrent code stores
``gamma * S_t`` instead, which is the same function with the state exchanged through a factor gamma.
Inputs may be bf16 under autocast: everything here computes in fp32 and returns outputs in the input dtype.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from msrnn.errors import ConfigError

log = logging.getLogger(__name__)

DECAYS = ("lightning", "retnet", "none")


def log_decay(num_heads: int, kind: str = "lightning") -> torch.Tensor:
    """log(gamma_h) per head, [H] fp32.

    * ``lightning`` (official SUPRA default, ``use_retnet_slopes=false``): gamma_h = exp(-2^(-8(h+1)/H));
    * ``retnet``: gamma_h = 1 - 2^(-5-h);
    * ``none``: gamma = 1 (no decay; the state's scale then grows with length).
    """
    if num_heads < 1:
        raise ConfigError(f"num_heads must be >= 1, got {num_heads}")
    h = torch.arange(num_heads, dtype=torch.float64)
    if kind == "lightning":
        out = -(2.0 ** (-8.0 * (h + 1) / num_heads))
    elif kind == "retnet":
        out = torch.log1p(-(2.0 ** (-5.0 - h)))
    elif kind == "none":
        out = torch.zeros(num_heads, dtype=torch.float64)
    else:
        raise ConfigError(f"unknown decay schedule {kind!r}; use one of {', '.join(DECAYS)}")
    return out.float()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, state,
           resets: torch.Tensor | None = None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ConfigError(f"expected q, k [B, H, T, Dk] and v [B, H, T, Dv]; got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    if log_gamma.shape != (q.shape[1],):
        raise ConfigError(f"log_gamma must have one value per head ({q.shape[1]}), got {tuple(log_gamma.shape)}")
    if state is not None and state.shape != (q.shape[0], q.shape[1], q.shape[3], v.shape[3]):
        raise ConfigError(f"state must be [B, H, Dk, Dv] = {(q.shape[0], q.shape[1], q.shape[3], v.shape[3])}, "
                          f"got {tuple(state.shape)}")
    if resets is not None and (resets.shape != (q.shape[0], q.shape[2]) or resets.dtype != torch.bool):
        raise ConfigError(f"resets must be a bool [B, T] = {(q.shape[0], q.shape[2])} tensor, got "
                          f"{resets.dtype} {tuple(resets.shape)}")


def document_starts(position_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Where a new document starts inside a packed input, from its position ids: a position that does not follow
    the one before it (the rule transformers uses to find packed sequences, so SUPRA and a softmax model agree on
    the documents). [B, T] bool, or None when there is no start after the first token (the common case)."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return None
    pos = position_ids.expand(batch, -1)  # [B, T]
    starts = torch.zeros_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return starts if bool(starts.any()) else None


def _zero_state(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_zeros((q.shape[0], q.shape[1], q.shape[3], v.shape[3]), dtype=torch.float32)


def chunked_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                    scale: float | None = None, initial_state: torch.Tensor | None = None,
                    resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loop. q, k [B, H, T, Dk], v [B, H, T, Dv] -> (o [B, H, T, Dv], state [B, H, Dk, Dv] fp32)."""
    _check(q, k, v, log_gamma, initial_state, resets)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    S = _zero_state(q, v) if initial_state is None else initial_state.float()
    gamma = log_gamma.float().exp().to(q.device)[None, :, None, None]  # [1, H, 1, 1]
    qf, kf, vf = q.float(), k.float() * scale, v.float()
    outs = []
    for t in range(q.shape[2]):
        if resets is not None:  # a document starts at t: nothing before it is kept
            S = S * (~resets[:, t]).float().to(S.device)[:, None, None, None]
        S = gamma * S + kf[:, :, t, :, None] * vf[:, :, t, None, :]  # [B, H, Dk, Dv]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, :, t], S))
    return torch.stack(outs, dim=2).to(q.dtype), S


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                   scale: float | None = None, state: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token (T = 1) for decoding; same contract as :func:`chunked_ref`."""
    if q.shape[2] != 1:
        raise ConfigError(f"recurrent_step takes one token, got {q.shape[2]}; use chunked() for more")
    return chunked_ref(q, k, v, log_gamma, scale, state)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
            scale: float | None = None, initial_state: torch.Tensor | None = None, chunk_size: int = 64,
            block_chunks: int = 16, resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form; same contract as :func:`chunked_ref`. Any T (the last chunk may be short).

    Inside chunk c (positions i, j = 0..C-1), with S_c the state before it:
        o_i     = gamma^(i+1) q_i S_c + sum_{j<=i} gamma^(i-j) (q_i . k_j) v_j
        S_{c+1} = gamma^C S_c + U_c,   U_c = sum_j gamma^(C-1-j) k_j^T v_j
    All chunks of a block of ``block_chunks`` chunks are computed at once: the intra-chunk terms, U_c and the
    inter-chunk readout as batched matmuls; only the cheap S_c recurrence runs as a loop over chunks. Blocks are
    processed in sequence with the state carried, so memory stays O(block_chunks * C * D + block_chunks * D^2).

    With ``resets``, every position gets a document number d (the count of starts up to it) and the three terms
    keep only what lies in the same document: pairs (i, j) inside a chunk with d_i = d_j; the carried state for
    positions with no start since the chunk began; U_c from the chunk's last document; and S_c carried past the
    chunk only when no document starts in it.
    """
    _check(q, k, v, log_gamma, initial_state, resets)
    if chunk_size < 1 or block_chunks < 1:
        raise ConfigError(f"chunk_size and block_chunks must be >= 1, got {chunk_size}, {block_chunks}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    T = q.shape[2]
    S = _zero_state(q, v) if initial_state is None else initial_state.float()
    lg = log_gamma.float().to(q.device)
    qf, kf, vf = q.float(), k.float() * scale, v.float()
    doc = before = None
    if resets is not None:
        doc = resets.to(q.device).long().cumsum(-1)  # [B, T] document number of each position
        before = torch.cat([torch.zeros_like(doc[:, :1]), doc[:, :-1]], dim=1)  # [B, T] the previous position's
    outs = []
    full = T // chunk_size * chunk_size
    span = chunk_size * block_chunks

    def block(a: int, b: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
        docs = None if doc is None else (doc[:, a:b], before[:, a:b])
        return _chunk_block(qf[:, :, a:b], kf[:, :, a:b], vf[:, :, a:b], lg, S, C, docs)

    for start in range(0, full, span):
        o, S = block(start, min(start + span, full), chunk_size)
        outs.append(o)
    if full < T:  # the short last chunk
        o, S = block(full, T, T - full)
        outs.append(o)
    return torch.cat(outs, dim=2).to(q.dtype), S


def _chunk_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lg: torch.Tensor, S: torch.Tensor,
                 C: int, docs: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """n = T/C whole chunks at once (fp32 inputs, k already scaled); returns (o [B, H, T, Dv], state).
    ``docs``: each position's document number and its predecessor's, [B, T] each (see :func:`chunked`)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    n = T // C
    qc, kc, vc = q.reshape(B, H, n, C, Dk), k.reshape(B, H, n, C, Dk), v.reshape(B, H, n, C, Dv)
    idx = torch.arange(C, device=q.device, dtype=torch.float32)
    rel = idx[:, None] - idx[None, :]  # [C, C] i - j
    lgh = lg[:, None, None]  # [H, 1, 1]
    intra = torch.where(rel >= 0, (lgh * rel.clamp(min=0)).exp(), 0.0)  # [H, C, C]
    inter = (lg[:, None] * (idx + 1)).exp()[:, None, :, None]  # [H, 1, C, 1]: gamma^(i+1)
    tail = (lg[:, None] * (C - 1 - idx)).exp()[:, None, :, None]  # [H, 1, C, 1]: gamma^(C-1-j)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * intra[:, None]  # [B, H, n, C, C]
    keep = None
    if docs is not None:
        d = docs[0].view(B, 1, n, C)  # [B, 1, n, C]
        first = docs[1].view(B, 1, n, C)[..., :1]  # [B, 1, n, 1]: the document the carried state belongs to
        last = d[..., -1:]  # [B, 1, n, 1]: the document the state leaving the chunk belongs to
        scores = scores * (d[..., :, None] == d[..., None, :])  # [B, H, n, C, C]: same document only
        inter = inter * (d == first)[..., None]  # [B, 1, n, C, 1]: no start since the chunk began
        tail = tail * (d == last)[..., None]  # [B, 1, n, C, 1]: only the last document enters the state
        keep = (last == first).float()[..., 0]  # [B, 1, n]: no start in the chunk, the old state goes on
    o = torch.matmul(scores, vc)  # [B, H, n, C, Dv]
    U = torch.matmul((kc * tail).transpose(-1, -2), vc)  # [B, H, n, Dk, Dv]
    # Chunk-start states by a scan over chunks: n cheap [B, H, Dk, Dv] steps (an [n, n] prefix matmul would cost
    # O(n^2 D^2) and dominate for small chunks).
    decay_c = (lg * C).exp()[None, :, None, None]  # gamma^C [1, H, 1, 1]
    starts = []
    for c in range(n):
        starts.append(S)
        S = decay_c * S + U[:, :, c] if keep is None else decay_c * S * keep[:, :, c, None, None] + U[:, :, c]
    o = o + inter * torch.matmul(qc, torch.stack(starts, dim=2))  # [B, H, n, C, Dv]
    S_next = S
    return o.reshape(B, H, T, Dv), S_next


BACKENDS = ("auto", "torch", "fla")


def fla_available() -> bool:
    """flash-linear-attention is installed (its Triton kernels also need a CUDA device)."""
    try:
        import fla.ops.simple_gla  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise on a machine without a GPU
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> str:
    """``auto`` uses flash-linear-attention on CUDA when it is installed, the torch forms otherwise."""
    if requested not in BACKENDS:
        raise ConfigError(f"unknown linear-attention backend {requested!r}; use auto, torch or fla")
    if requested == "torch":
        return "torch"
    usable = device.type == "cuda" and fla_available()
    if requested == "fla" and not usable:
        raise ConfigError("backend 'fla' needs a CUDA device and `pip install 'msrnn[gpu]'`; use backend 'torch'")
    return "fla" if usable else "torch"


def fla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                scale: float | None = None, initial_state: torch.Tensor | None = None, kernel=None,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-linear-attention's simple-GLA kernel with a head-wise constant decay; same contract as :func:`chunked`.

    fla works in [B, T, H, D] and stores the state after the decay, as we do, but it scales q where we scale k:
    outputs agree, while its state is ours divided by ``scale``, so carried states are converted both ways.
    ``kernel`` defaults to ``fla.ops.simple_gla.chunk_simple_gla``; tests pass fla's pure-PyTorch reference to check
    this plumbing on a CPU.

    With ``resets`` (packed documents) the rows are laid end to end as one sequence cut by ``cu_seqlens`` at every
    row and document start (fla's variable-length form, FlashAttention's convention): a row's carried state enters
    its first document, and its final state is its last document's. That reading of fla's contract is verified
    once per kernel and device against :func:`chunked` (:func:`fla_varlen_failure`); where it does not hold, packed
    inputs run :func:`chunked`, with a warning naming the check.
    """
    _check(q, k, v, log_gamma, initial_state, resets)
    if kernel is None:
        from fla.ops.simple_gla import chunk_simple_gla as kernel
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if resets is not None:
        if fla_varlen_failure(kernel, q.device) is not None:
            return chunked(q, k, v, log_gamma, scale, initial_state, resets=resets)
        return _fla_varlen(q, k, v, log_gamma, scale, initial_state, kernel, resets)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, T, H, D]
    h0 = None if initial_state is None else initial_state.float() / scale
    o, S = kernel(qt, kt, vt, g_gamma=log_gamma.float().to(q.device), scale=scale, initial_state=h0,
                  output_final_state=True)
    return o.transpose(1, 2).to(q.dtype), S.float() * scale


def _fla_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, scale: float,
                initial_state: torch.Tensor | None, kernel, resets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows as one variable-length batch for fla (see :func:`fla_chunked`)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    resets = resets.to(q.device)
    starts = resets.clone()
    starts[:, 0] = True  # every row begins a sequence
    first = torch.nonzero(starts.flatten()).flatten()  # [N] where each sequence begins in the [B * T] layout
    cu = torch.cat([first, first.new_tensor([B * T])])  # [N + 1] cumulative lengths
    row = first // T  # [N] the row each sequence is in
    qt, kt, vt = (x.transpose(1, 2).reshape(1, B * T, H, -1).contiguous() for x in (q, k, v))  # [1, B*T, H, D]
    h0 = None
    if initial_state is not None:  # a row's state enters its first sequence, unless a document starts there
        carried = (first % T == 0) & ~resets.flatten()[first]  # [N]
        h0 = q.new_zeros(len(first), H, Dk, Dv, dtype=torch.float32)
        h0[carried] = initial_state.float()[row[carried]] / scale
    o, S = kernel(qt, kt, vt, g_gamma=log_gamma.float().to(q.device), scale=scale, initial_state=h0,
                  output_final_state=True, cu_seqlens=cu)
    last = torch.searchsorted(row, torch.arange(B, device=q.device), right=True) - 1  # [B] each row's last sequence
    out = o.reshape(B, T, H, Dv).transpose(1, 2).to(q.dtype)  # [B, H, T, Dv]
    return out, S.float()[last] * scale


_FLA_VARLEN: dict[tuple[Any, str], str | None] = {}  # (kernel, device) -> why the varlen form is not used, or None
VARLEN_CHECK = "fla_varlen_equals_chunked"


def fla_varlen_failure(kernel, device: torch.device) -> str | None:
    """None when ``kernel`` with ``cu_seqlens`` gives :func:`chunked`'s outputs and final states on packed rows
    (two rows, documents starting mid-row, at a row's first token and on its last, a carried state), checked once
    per kernel and device; otherwise why not (and a warning, once)."""
    key = (kernel, str(device))
    if key not in _FLA_VARLEN:
        g = torch.Generator().manual_seed(0)
        B, H, T, D = 2, 2, 80, 16
        q, k, v = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(3))
        s0 = torch.randn(B, H, D, D, generator=g).to(device)
        resets = torch.zeros(B, T, dtype=torch.bool)
        resets[0, [5, 6, 70]] = True
        resets[1, [0, 33, 79]] = True
        lg = log_decay(H, "retnet").to(device)
        try:
            o_ref, s_ref = chunked(q, k, v, lg, initial_state=s0, resets=resets.to(device))
            o, s = _fla_varlen(q, k, v, lg, 1.0 / math.sqrt(D), s0, kernel, resets.to(device))
            err = max(float((o.float() - o_ref).abs().max()), float((s - s_ref).abs().max()))
            scale = max(float(o_ref.abs().max()), float(s_ref.abs().max()))
            why = None if err <= 1e-2 * scale else f"outputs or states differ by {err:.3g} (largest {scale:.3g})"
        except Exception as exc:  # a kernel without cu_seqlens, or another contract
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if why is not None:
            log.warning("SUPRA: check %s failed for %s (%s); packed documents run the torch scan", VARLEN_CHECK,
                        getattr(kernel, "__name__", kernel), why)
        _FLA_VARLEN[key] = why
    return _FLA_VARLEN[key]
