"""Re-rotating RoPE keys and queries (for StreamingLLM's positions-inside-the-cache convention).

RoPE rotates channel pairs by ``position * inv_freq[i]``; rotations compose, so a vector rotated for position ``p``
is moved to ``p + delta`` by rotating it by ``delta``. Keys therefore stay cached at their original positions
(TOVA's convention) and are moved to in-cache positions only inside the attention computation.

Models pair channels differently and not every layer rotates, so each layer gets a :class:`Rotation`: the
``half`` layout pairs ``(i, i + r/2)`` (Hugging Face's ``rotate_half``), ``interleaved`` pairs ``(2i, 2i + 1)``
(GLM, Cohere, Helium, ERNIE), and ``none`` leaves a layer without RoPE (SmolLM3's and Llama-4's NoPE layers)
unrotated; only the first ``2 * len(inv_freq)`` channels rotate (partial rotary). msrnn does not declare which model
uses which: :mod:`msrnn.kv.verify` finds each layer's rotation by probing the model itself and refuses rolling
positions where none fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msrnn.rope import rope_tables, rotate_by

ROTATION_LAYOUTS = ("half", "interleaved", "none")


@dataclass(frozen=True)
class Rotation:
    """How one layer's RoPE rotates its queries and keys: a channel layout and its inverse frequencies (None for
    ``none``). ``source`` names the model buffer the frequencies come from (e.g. ``model.rotary_emb.inv_freq``)."""

    layout: str
    inv_freq: torch.Tensor | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in ROTATION_LAYOUTS:
            raise ValueError(f"unknown RoPE layout {self.layout!r}; use {', '.join(ROTATION_LAYOUTS)}")
        if (self.layout == "none") != (self.inv_freq is None):
            raise ValueError("a rotating layout needs inv_freq, and 'none' takes none")


def rotary_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every inverse-frequency buffer of a HF model by name (``...inv_freq``, ``...local_inv_freq``,
    ``...sliding_attention_inv_freq``, ...), fp32 copies; models with several RoPE variants have several."""
    out = {}
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq") and buf.dim() == 1 and buf.is_floating_point():
            out[name] = buf.detach().float().clone()
    return out


def find_inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """The first rotary inverse-frequency buffer of a HF model, or None if it has no RoPE."""
    return next(iter(rotary_buffers(model).values()), None)


def rotate(x: torch.Tensor, delta: torch.Tensor, rotation: Rotation | torch.Tensor | None) -> torch.Tensor:
    """Rotate ``x`` [B, H, N, D] by ``delta`` [B, 1 or H, N] positions under ``rotation`` (a bare ``inv_freq``
    tensor means the ``half`` layout; None or ``none`` returns ``x``)."""
    if rotation is None:
        return x
    if isinstance(rotation, torch.Tensor):
        rotation = Rotation("half", rotation)
    if rotation.layout == "none":
        return x
    inv_freq = rotation.inv_freq
    rot = 2 * inv_freq.numel()
    xr, rest = x[..., :rot].float(), x[..., rot:]
    if rotation.layout == "half":
        cos, sin = rope_tables(delta, inv_freq)  # [B, h, N, rot]
        out = rotate_by(xr, cos, sin)
    else:  # interleaved: channel pairs (2i, 2i + 1) turn by delta * inv_freq[i]
        angle = delta.to(torch.float32)[..., None] * inv_freq.to(delta.device)  # [B, h, N, rot/2]
        cos, sin = angle.cos(), angle.sin()
        x1, x2 = xr[..., 0::2], xr[..., 1::2]  # [B, H, N, rot/2] each
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)  # [B, H, N, rot]
    return torch.cat([out.to(x.dtype), rest], dim=-1)
