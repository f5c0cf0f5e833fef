"""Rotary position embeddings (Su et al., 2021) in Hugging Face's ``rotate_half`` channel layout.

One helper below the families, so no family imports a modeling file's internals for it.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def inverse_frequencies(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """The default RoPE frequencies theta^(-2i/dim) for i < dim/2, fp32 [dim/2]."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [..., 2 * len(inv_freq)] fp32 for ``positions`` [...] (any shape, any integer or float dtype)."""
    angle = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # [..., D/2]
    return torch.cat([angle.cos(), angle.cos()], dim=-1), torch.cat([angle.sin(), angle.sin()], dim=-1)


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with tables that broadcast against ``x`` as they are."""
    return x * cos + rotate_half(x) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by the tables ``cos``, ``sin`` [B, T, D] (as the models' rotary modules make)."""
    return rotate_by(x, cos.unsqueeze(1), sin.unsqueeze(1))  # [B, 1, T, D]: the same rotation for every head
