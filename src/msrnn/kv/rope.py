"""Re-rotating RoPE keys and queries (for StreamingLLM's positions-inside-the-cache convention).

RoPE rotates each pair of channels ``(i, i + d/2)`` (the Hugging Face ``rotate_half`` layout) by
``position * inv_freq[i]``; rotations compose, so a vector rotated for position ``p`` is moved to ``p + delta``
by rotating it by ``delta``. Keys therefore stay cached at their original positions (TOVA's convention) and are
moved to in-cache positions only inside the attention computation.
"""

from __future__ import annotations

import torch

from msrnn.rope import rope_tables, rotate_by


def find_inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """The rotary inverse frequencies of a HF model, or None if it has no RoPE."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            return module.inv_freq.detach().float().clone()
    return None


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, N, D] by ``delta`` [B, 1 or H, N] positions (the first 2*len(inv_freq) channels)."""
    rot = 2 * inv_freq.numel()
    cos, sin = rope_tables(delta, inv_freq)  # [B, h, N, rot]
    xr, rest = x[..., :rot].float(), x[..., rot:]
    out = rotate_by(xr, cos, sin)
    return torch.cat([out.to(x.dtype), rest], dim=-1)
