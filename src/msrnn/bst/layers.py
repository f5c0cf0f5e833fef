"""BST building blocks: rotary block attention, the context-state SSM and the BST / block-attention layer.

Every layer has two forms of one function: ``forward`` over a whole sequence (all blocks in parallel, the SSM by
FFT) and ``step`` over a piece of tokens that lies inside one block, carrying a constant-size state (the SSM
state, the current block's keys/values, the previous block's for ``slide``). Tests check they agree.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msrnn.bst.config import BSTConfig
from msrnn.rope import inverse_frequencies, rope_tables, rotate_by
from msrnn.ssm.s4d import S4DKernel, fft_conv
from msrnn.ssm.unstruct import UnstructFilter, fir_conv


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [..., T, dh] at absolute positions pos [T] (attention is local, so only distances
    below 2W ever matter: any stream length stays inside what training saw)."""
    cos, sin = rope_tables(pos, inverse_frequencies(x.shape[-1], theta, x.device))  # [T, dh]
    return rotate_by(x, cos.to(x.dtype), sin.to(x.dtype))


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """[B, T, h * dh] -> [B, h, T, dh]."""
    B, T, _ = x.shape
    return x.view(B, T, h, -1).transpose(1, 2)  # [B, h, T, dh]


def merge(x: torch.Tensor) -> torch.Tensor:
    """[B, h, T, dh] -> [B, T, h * dh]."""
    B, h, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, h * dh)  # [B, T, d]


def block_mask(t: int, offset: int, current: int, prev: int, device: Any) -> torch.Tensor:
    """[t, prev + current] booleans: queries at in-block positions offset..offset+t-1 see every key of the
    previous block and the current block's keys up to themselves."""
    q = torch.arange(offset, offset + t, device=device)[:, None]
    k = torch.arange(current, device=device)[None]
    return torch.cat([torch.ones(t, prev, dtype=torch.bool, device=device), k <= q], dim=1)


class MLP(nn.Module):
    """The gated (SwiGLU) feed-forward block of a Llama layer."""

    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False), \
            nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x))."""
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ContextSSM(nn.Module):
    """The SSM sublayer: u = the normed input, repeated per head (MH) or per filter (MF); outputs context states.

    SH: one SSM over d channels, its output at every position (cross-attended causally inside the block).
    MH: one SSM per head; head i cross-attends to its own SSM's outputs.
    MF: S SSMs; block k sees the S outputs at the end of block k-1 (block 0: a learned initial context), plus
    learned context ids, with no mask.
    """

    def __init__(self, cfg: BSTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.rep = {"sh": 1, "mh": cfg.num_attention_heads, "mf": cfg.mf_states}[cfg.variant]
        channels = self.rep * d
        if cfg.kernel == "s4":
            self.kernel = S4DKernel(channels, cfg.state_size)
        else:
            self.kernel = UnstructFilter(channels, cfg.filter_length)
            for m in self.kernel.mlp:
                m._keep_init = True  # the sine MLP keeps its default init (post_init would shrink it)
        self.post = nn.Linear(d, d, bias=False)
        if cfg.variant == "mf":
            self.init_context = nn.Parameter(torch.randn(cfg.mf_states, d) * 0.02)
            self.context_ids = nn.Parameter(torch.randn(cfg.mf_states, d) * 0.02)

    def conv(self, u: torch.Tensor, state: Any = None, streaming: bool = True) -> tuple[torch.Tensor, Any]:
        """u [B, T, d] -> (y [B, rep, T, d] fp32, new SSM state; None when not ``streaming``)."""
        B, T, d = u.shape
        x = u.float().transpose(1, 2).repeat(1, self.rep, 1)  # [B, rep*d, T]
        if self.cfg.kernel == "s4":
            y, state = fft_conv(x, self.kernel, state, want_state=streaming)
        else:
            y, state = fir_conv(x, self.kernel, state)
        return y.view(B, self.rep, d, T).transpose(2, 3), state  # [B, rep, T, d]

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        """SSM outputs [..., d] -> context states (GELU, then a projection), in the model's dtype."""
        return self.post(F.gelu(y).to(self.post.weight.dtype))

    def zero_state(self, batch: int, device: Any) -> Any:
        """The SSM's state before any input."""
        return self.kernel.zero_state(batch, device)


class BSTLayer(nn.Module):
    """One BST layer: block self-attention (+ cross-attention to the SSM's context states), then the MLP."""

    def __init__(self, cfg: BSTConfig, has_ssm: bool) -> None:
        super().__init__()
        self.cfg, self.has_ssm = cfg, has_ssm
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.h, self.hkv = h, cfg.num_key_value_heads
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=cfg.rms_norm_eps), nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.q = nn.Linear(d, d, bias=False)
        self.k, self.v = (nn.Linear(d, self.hkv * cfg.head_dim, bias=False) for _ in range(2))
        self.prev_blocks = 1 if cfg.variant == "slide" else 0
        if has_ssm:
            self.ssm = ContextSSM(cfg)
            self.q2, self.k2, self.v2 = (nn.Linear(d, d, bias=False) for _ in range(3))
            self.o = nn.Linear(2 * d, d, bias=False)  # concat(self-attn, cross-attn) -> d, as BRECT's vertical cell
        else:
            self.o = nn.Linear(d, d, bias=False)
        self.mlp = MLP(d, cfg.intermediate_size)

    # ------------------------------------------------------------------ cross-attention keys/values
    def _context_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context states -> per-head keys/values. SH/MF: ctx [B, T, d]; MH: ctx [B, h, T, d], head i's own."""
        if self.cfg.variant == "mh":
            dh = self.cfg.head_dim
            wk = self.k2.weight.view(self.h, dh, -1)
            wv = self.v2.weight.view(self.h, dh, -1)
            return torch.einsum("bhtd,hed->bhte", ctx, wk), torch.einsum("bhtd,hed->bhte", ctx, wv)
        return heads(self.k2(ctx), self.h), heads(self.v2(ctx), self.h)

    def _lift_positions(self, y: torch.Tensor) -> torch.Tensor:
        """SSM outputs at token positions [B, rep, T, d] -> context for SH ([B, T, d]) or MH ([B, h, T, d])."""
        ctx = self.ssm.lift(y)
        return ctx[:, 0] if self.cfg.variant == "sh" else ctx

    def _mf_context(self, states: torch.Tensor) -> torch.Tensor:
        """MF: [..., S, d] SSM outputs at a block end -> context states with ids."""
        return self.ssm.lift(states) + self.ssm.context_ids

    def _finish(self, x: torch.Tensor, sa: torch.Tensor, ca: torch.Tensor | None) -> torch.Tensor:
        out = self.o(sa if ca is None else torch.cat([sa, ca], dim=-1))
        x = x + out
        return x + self.mlp(self.norm2(x))

    # ------------------------------------------------------------------ parallel form
    def forward(self, x: torch.Tensor, W: int) -> torch.Tensor:
        """x [B, L, d] with L a multiple of W (the model pads): all blocks at once."""
        B, L, d = x.shape
        nb, h, hkv, dh = L // W, self.h, self.hkv, self.cfg.head_dim
        hn = self.norm1(x)
        pos = torch.arange(L, device=x.device)
        q = rope(heads(self.q(hn), h), pos, self.cfg.rope_theta)
        k = rope(heads(self.k(hn), hkv), pos, self.cfg.rope_theta)
        v = heads(self.v(hn), hkv)

        def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, n, L, dh] -> [B*nb, n, W, dh]
            n = t.shape[1]
            return t.view(B, n, nb, W, dh).transpose(1, 2).reshape(B * nb, n, W, dh)

        qb, kb, vb = blocks(q), blocks(k), blocks(v)
        mask = None  # within one block the mask is plain causal: SDPA's is_causal path, no [W, W] tensor
        if self.prev_blocks:
            kp = torch.roll(kb.view(B, nb, hkv, W, dh), 1, dims=1).view(B * nb, hkv, W, dh)
            vp = torch.roll(vb.view(B, nb, hkv, W, dh), 1, dims=1).view(B * nb, hkv, W, dh)
            kb, vb = torch.cat([kp, kb], dim=2), torch.cat([vp, vb], dim=2)
            first = torch.arange(nb, device=x.device).repeat(B) == 0  # block 0 has no previous block
            mask = block_mask(W, 0, W, W, x.device)[None].repeat(B * nb, 1, 1)
            mask[first, :, :W] = False
            mask = mask[:, None]
        sa = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None,
                                            enable_gqa=hkv != h)  # [B*nb, h, W, dh]
        sa = merge(sa.view(B, nb, h, W, dh).transpose(1, 2).reshape(B, h, L, dh))
        ca = None
        if self.has_ssm:
            y, _ = self.ssm.conv(hn, streaming=False)  # [B, rep, L, d]
            q2 = blocks(heads(self.q2(hn), h))
            if self.cfg.variant == "mf":
                ends = y[:, :, W - 1 :: W]  # [B, S, nb, d]: outputs at each block's last position
                prev = torch.cat([self.ssm.init_context.float()[None, :, None].expand(B, -1, 1, -1),
                                  ends[:, :, :-1]], dim=2)  # block k sees the end of block k-1
                ctx = self._mf_context(prev.transpose(1, 2))  # [B, nb, S, d]
                k2, v2 = self._context_kv(ctx.reshape(B * nb, -1, d))  # [B*nb, h, S, dh]
                ca = F.scaled_dot_product_attention(q2, k2, v2)
            else:
                k2, v2 = self._context_kv(self._lift_positions(y))  # [B, h, L, dh]
                ca = F.scaled_dot_product_attention(q2, blocks(k2), blocks(v2), is_causal=True)
            ca = merge(ca.view(B, nb, h, W, dh).transpose(1, 2).reshape(B, h, L, dh))
        return self._finish(x, sa, ca)

    # ------------------------------------------------------------------ streaming form
    def init_state(self, batch: int, device: Any) -> dict[str, Any]:
        """Empty block caches (and the SSM state, for SSM layers) for ``batch`` sequences."""
        # Block keys/values in the attention's dtype (the SSM state below stays fp32): an fp32 empty cache would
        # promote a bf16/fp16 model's keys to fp32 and SDPA refuses mixed dtypes.
        dtype = self.k.weight.dtype
        empty = torch.zeros(batch, self.hkv, 0, self.cfg.head_dim, device=device, dtype=dtype)
        state: dict[str, Any] = {"k": empty, "v": empty, "kp": None, "vp": None}
        if self.has_ssm:
            state["ssm"] = self.ssm.zero_state(batch, device)
            empty2 = torch.zeros(batch, self.h, 0, self.cfg.head_dim, device=device, dtype=dtype)
            state["k2"], state["v2"] = empty2, empty2
            if self.cfg.variant == "mf":
                state["ctx"] = self.ssm.init_context.float()[None].expand(batch, -1, -1)  # [B, S, d]
        return state

    def step(self, x: torch.Tensor, state: dict[str, Any], start: int, offset: int, W: int | None) -> torch.Tensor:
        """x [B, t, d]: tokens at absolute positions start.., in-block positions offset.. (one block)."""
        B, t, d = x.shape
        h = self.h
        hn = self.norm1(x)
        pos = torch.arange(start, start + t, device=x.device)
        q = rope(heads(self.q(hn), h), pos, self.cfg.rope_theta)
        state["k"] = torch.cat([state["k"], rope(heads(self.k(hn), self.hkv), pos, self.cfg.rope_theta)], dim=2)
        state["v"] = torch.cat([state["v"], heads(self.v(hn), self.hkv)], dim=2)
        k, v, prev = state["k"], state["v"], 0
        if self.prev_blocks and state["kp"] is not None:
            k, v, prev = torch.cat([state["kp"], k], 2), torch.cat([state["vp"], v], 2), state["kp"].shape[2]
        mask = block_mask(t, offset, state["k"].shape[2], prev, x.device)
        sa = merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.hkv != h))
        ca = None
        if self.has_ssm:
            y, state["ssm"] = self.ssm.conv(hn, state["ssm"])  # [B, rep, t, d]
            q2 = heads(self.q2(hn), h)
            if self.cfg.variant == "mf":
                k2, v2 = self._context_kv(self._mf_context(state["ctx"]))
                ca = merge(F.scaled_dot_product_attention(q2, k2, v2))
                if W is not None and offset + t == W:
                    state["ctx"] = y[:, :, -1]  # [B, S, d]: the next block's context
            else:
                k2, v2 = self._context_kv(self._lift_positions(y))
                state["k2"], state["v2"] = torch.cat([state["k2"], k2], 2), torch.cat([state["v2"], v2], 2)
                mask2 = block_mask(t, offset, state["k2"].shape[2], 0, x.device)
                ca = merge(F.scaled_dot_product_attention(q2, state["k2"], state["v2"], attn_mask=mask2))
        if W is not None and offset + t == W:  # the block is complete: its keys become the previous block's
            if self.prev_blocks:
                state["kp"], state["vp"] = state["k"], state["v"]
            state["k"], state["v"] = state["k"][:, :, :0], state["v"][:, :, :0]
            if self.has_ssm and self.cfg.variant != "mf":
                state["k2"], state["v2"] = state["k2"][:, :, :0], state["v2"][:, :, :0]
        return self._finish(x, sa, ca)
