"""Causal long convolution by FFT, shared by the structured (S4D) and unstructured (Hyena-style) kernels."""

from __future__ import annotations

import torch


def causal_fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s<=t} K_{t-s} u_s for u [B, C, L] and K [C, <=L], in fp32 (padded to 2L: linear, not circular).

    torch's irfft carries the 1/n, so no extra normalisation is needed (the BST appendix pseudocode's
    ``norm="forward"`` without dividing the spectrum would be n times too large)."""
    L = u.shape[-1]
    with torch.autocast(device_type=u.device.type, enabled=False):
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(K.float(), n=n), n=n)
    return y[..., :L]
