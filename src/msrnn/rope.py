"""Rotary position embeddings (Su et al., 2021) in Hugging Face's ``rotate_half`` channel layout.

One helper below the families, so no family imports a modeling file's internals for it.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by the tables ``cos``, ``sin`` [B, T, D] (as the models' rotary modules make)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]: the same rotation for every head
    return x * cos + rotate_half(x) * sin
