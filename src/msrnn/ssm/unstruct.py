"""An unstructured long-convolution filter for the BST UNSTRUCT variants (Hyena-style implicit filter; Poli et
al., 2023, and the BST appendix's ``exp(-alpha t) * dense(positional_emb(t))``).

The filter has ``length`` explicit taps (the training length): an MLP with sine activations maps positional
features of t = l / length to one tap per channel, times a per-channel exponential decay. Taps beyond ``length``
are zero, so the streaming state is the last ``length - 1`` inputs (bounded, but ``length`` times larger than an
S4D state) and the model cannot use context further back than it was trained on: the length-generalisation
weakness the paper reports for UNSTRUCT. Deviation from Hyena: no short depthwise conv, no gating.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from msrnn.errors import ConfigError
from msrnn.ssm.conv import causal_fft_conv
from msrnn.ssm.fp32 import FP32Parameters


class Sine(nn.Module):
    def __init__(self, dim: int, freq: float = 1.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(freq * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class UnstructFilter(FP32Parameters):
    def __init__(self, channels: int, length: int, bands: int = 8, width: int = 64) -> None:
        super().__init__()
        if length < 1:
            raise ConfigError(f"the unstructured filter needs length >= 1, got {length}")
        self.channels, self.length, self.bands = channels, length, bands
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * bands, width), Sine(width), nn.Linear(width, width), Sine(width),
                                 nn.Linear(width, channels))
        # Decay rates spread over channels so some filters are short and some reach the whole length.
        self.log_decay = nn.Parameter(torch.linspace(math.log(0.3), math.log(10.0), channels))
        self.D = nn.Parameter(torch.randn(channels))

    def kernel(self, length: int) -> torch.Tensor:
        """K [C, length] fp32: the explicit taps, zero beyond the trained length."""
        self.check_fp32()
        with torch.autocast(device_type=self.D.device.type, enabled=False):
            taps = min(length, self.length)
            t = torch.arange(taps, device=self.D.device, dtype=torch.float32)[:, None] / self.length  # [taps, 1]
            f = torch.arange(1, self.bands + 1, device=t.device, dtype=torch.float32)
            z = torch.cat([t, torch.sin(2 * math.pi * f * t), torch.cos(2 * math.pi * f * t)], dim=-1)
            k = self.mlp(z) * torch.exp(-self.log_decay.exp() * t)  # [taps, C]
            K = k.t().contiguous()  # [C, taps]
            if taps < length:
                K = torch.nn.functional.pad(K, (0, length - taps))
            return K

    def zero_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.channels, self.length - 1, device=device)


def fir_conv(u: torch.Tensor, filt: UnstructFilter, state: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """u [B, C, T] -> (y [B, C, T] in u's dtype, new state = the last length-1 inputs [B, C, length-1]).

    With a state, the previous inputs are prepended so the output equals one convolution over the whole stream."""
    keep = filt.length - 1
    uf = u.float()
    if state is None:
        state = filt.zero_state(u.shape[0], u.device)
    full = torch.cat([state, uf], dim=-1)  # [B, C, keep + T]
    y = causal_fft_conv(full, filt.kernel(full.shape[-1]))[..., keep:] + uf * filt.D.float()[:, None]
    return y.to(u.dtype), full[..., full.shape[-1] - keep :] if keep else full[..., :0]
