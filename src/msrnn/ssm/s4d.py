"""S4D: a diagonal state-space layer (Gu et al., 2022, "On the Parameterization and Initialization of Diagonal
State Space Models"), the SSM the Block-State Transformer builds on.

Per channel h, with N/2 complex modes (conjugate pairs folded into ``2 Re``), zero-order hold:

    A = -0.5 + i*pi*n (S4D-Lin),  dt log-uniform in [dt_min, dt_max],  Abar = exp(dt*A),  Bbar = expm1(dt*A) / A
    x_t = Abar * x_{t-1} + Bbar * u_t            state [B, H, N/2] complex64
    y_t = 2 Re(C . x_t) + D * u_t                i.e. y = K * u + D u with K_l = 2 Re(C Bbar Abar^l)

Three forms of one function, tested against each other: :func:`fft_conv_ref` (the readable reference),
:func:`fft_conv` (rfft padded to 2L, fp32, normalised by torch's irfft -- the BST appendix pseudocode forgets
both the axis and the 1/n), and :func:`recurrent_scan` (the step used for streaming). Each takes a carried state
and returns the final one, so long streams can be cut anywhere. The fast path never builds the O(H * N * L)
Vandermonde tensor: powers of Abar are split as Abar^(jc + i) = Abar^(jc) Abar^i and contracted by matmuls
(:func:`split_powers`); the reference path builds it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from msrnn.errors import ConfigError
from msrnn.ssm.conv import causal_fft_conv
from msrnn.ssm.fp32 import FP32Parameters

# The S4 recipe's optimiser settings for the SSM's dynamics (dt and A): no weight decay, lr at most 1e-3
# (state-spaces/s4 ``S4DKernel.register`` and ``example.py``). C is an ordinary parameter there, and here.
SSM_OPTIM = {"weight_decay": 0.0, "max_lr": 1e-3}


def _expm1_complex(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """exp(x + iy) - 1 without cancellation: ``Abar - 1`` in fp32 loses ~3 digits when |dt A| ~ 1e-5 (slow modes at
    dt = 1e-3; found by the float64 matrix-exponential test). Deviation from the official S4D, which subtracts."""
    real = torch.expm1(x) * torch.cos(y) - 2 * torch.sin(y / 2) ** 2
    return torch.complex(real, torch.exp(x) * torch.sin(y))


def split_powers(log_abar: torch.Tensor, length: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Abar^(offset + j*c + i) = Q[..., j] * P[..., i] for l = j*c + i < length, with c ~ sqrt(length).

    Both factors are small (O(H N sqrt L) complex exps instead of O(H N L)), and contracting them with a
    matmul never materialises the [H, N/2, L] Vandermonde tensor: kernel generation and the final state cost
    O(H L N) multiply-adds in BLAS. Each factor is one exp of an exact exponent, so no error accumulates."""
    c = max(1, math.isqrt(max(length, 1)))
    J = -(-length // c)
    dev = log_abar.device
    P = torch.exp(log_abar[..., None] * torch.arange(c, device=dev, dtype=torch.float32))  # [..., c]
    Q = torch.exp(log_abar[..., None] * (offset + c * torch.arange(J, device=dev, dtype=torch.float32)))  # [..., J]
    return P, Q


class S4DKernel(FP32Parameters):
    """Parameters of H independent diagonal SSMs and their convolution kernels (kept fp32, see ``ssm.fp32``).

    Initialisation as S4D-Lin: ``C ~ CN(0, 1)`` (``torch.randn`` of a complex dtype: E|C|^2 = 1), Re(A) = -0.5,
    Im(A) = pi n, dt log-uniform in [dt_min, dt_max], ``D ~ N(0, 1)``."""

    def __init__(self, channels: int, state_size: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        if state_size < 2 or state_size % 2:
            raise ConfigError(f"state_size must be an even number >= 2 (complex conjugate pairs), got {state_size}")
        if not 0 < dt_min < dt_max:
            raise ConfigError("need 0 < dt_min < dt_max")
        self.channels, self.modes = channels, state_size // 2
        log_dt = torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, self.modes, dtype=torch.cfloat)))
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(channels, self.modes)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(self.modes).float().expand(channels, -1).clone())
        self.D = nn.Parameter(torch.randn(channels))

    def optim_overrides(self) -> list[tuple[nn.Parameter, dict[str, float]]]:
        """Parameters the trainer must optimise differently (read by ``msrnn.train.trainer``)."""
        return [(p, SSM_OPTIM) for p in (self.log_dt, self.log_A_real, self.A_imag)]

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Abar, Bbar, C) as complex64 [H, N/2], computed in fp32 whatever the autocast state."""
        self.check_fp32()
        with torch.autocast(device_type=self.log_dt.device.type, enabled=False):
            re, im = -self.log_A_real.float().exp(), self.A_imag.float()  # [H, N/2]
            A = torch.complex(re, im)
            dt = self.log_dt.float().exp()[:, None]
            Abar = (A * dt).exp()
            Bbar = _expm1_complex(re * dt, im * dt) / A
            return Abar, Bbar, torch.view_as_complex(self.C.float().contiguous())

    def kernel(self, length: int) -> torch.Tensor:
        """K [H, L] fp32: K_l = 2 Re(sum_n C Bbar Abar^l), by the split-power matmul."""
        Abar, Bbar, C = self.discrete()
        P, Q = split_powers(Abar.log(), length)  # [H, N/2, c], [H, N/2, J]
        K = torch.matmul((C * Bbar)[:, :, None].mul(Q).transpose(1, 2), P)  # [H, J, c]
        return 2 * K.real.reshape(self.channels, -1)[:, :length]

    def kernel_ref(self, length: int) -> torch.Tensor:
        """The same kernel from the explicit [H, N/2, L] Vandermonde tensor (readable, memory-hungry)."""
        Abar, Bbar, C = self.discrete()
        vander = torch.exp(Abar.log()[:, :, None] * torch.arange(length, dtype=torch.float32))  # [H, N/2, L]
        return 2 * torch.einsum("hn,hnl->hl", C * Bbar, vander).real

    def zero_state(self, batch: int, device=None) -> torch.Tensor:
        """The zero complex state [B, H, N/2] before any input."""
        return torch.zeros(batch, self.channels, self.modes, dtype=torch.cfloat, device=device)


def _check(u: torch.Tensor, ssm: S4DKernel) -> None:
    if u.dim() != 3 or u.shape[1] != ssm.channels:
        raise ConfigError(f"expected u [B, {ssm.channels}, L], got {tuple(u.shape)}")


def _state_contribution(ssm: S4DKernel, state: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """y_t += 2 Re(C Abar^(t+1) x0): the carried state's effect on the next `length` outputs, [B, H, L]."""
    if state is None:
        return None
    Abar, _, C = ssm.discrete()
    P, Q = split_powers(Abar.log(), length, offset=1)  # Abar^(1 + j c + i)
    sq = (state * C)[..., None] * Q  # [B, H, N/2, J]
    y = torch.matmul(sq.transpose(2, 3), P)  # [B, H, J, c]
    return 2 * y.real.reshape(*state.shape[:2], -1)[..., :length]


def _final_state(ssm: S4DKernel, u: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """x_L = Abar^L x0 + sum_m Abar^m Bbar u_(L-1-m), [B, H, N/2] complex64 (split powers over m)."""
    Abar, Bbar, _ = ssm.discrete()
    B, H, L = u.shape
    log_abar = Abar.log()
    P, Q = split_powers(log_abar, L)  # [H, N/2, c], [H, N/2, J]
    c, J = P.shape[-1], Q.shape[-1]
    rev = torch.nn.functional.pad(u.flip(-1), (0, c * J - L))  # u_(L-1-m), zero past the start
    inner = torch.matmul(rev.view(B, H, J, c).to(torch.cfloat), P.transpose(1, 2))  # [B, H, J, N/2]
    x = Bbar * (inner * Q.transpose(1, 2)).sum(2)  # [B, H, N/2]
    if state is not None:
        x = x + state * torch.exp(log_abar * L)
    return x


def _finish(ssm: S4DKernel, uf: torch.Tensor, conv: torch.Tensor, state: torch.Tensor | None,
            dtype: torch.dtype, want_state: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add the D skip and the carried state's contribution to a convolution; compute the final state."""
    y = conv + uf * ssm.D.float()[:, None]
    extra = _state_contribution(ssm, state, uf.shape[-1])
    if extra is not None:
        y = y + extra
    return y.to(dtype), (_final_state(ssm, uf, state) if want_state else None)


def fft_conv(u: torch.Tensor, ssm: S4DKernel, state: torch.Tensor | None = None, want_state: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """u [B, H, L] -> (y [B, H, L] in u's dtype, final state or None when ``want_state`` is false: a parallel
    forward over a whole sequence has no use for it). FFT over time, padded to 2L, in fp32."""
    _check(u, ssm)
    L = u.shape[-1]
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf = u.float()
        return _finish(ssm, uf, causal_fft_conv(uf, ssm.kernel(L)), state, u.dtype, want_state)


def fft_conv_ref(u: torch.Tensor, ssm: S4DKernel, state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: y_t = sum_{s<=t} K_{t-s} u_s + D u_t (+ the carried state), O(L^2)."""
    _check(u, ssm)
    L = u.shape[-1]
    uf = u.float()
    K = ssm.kernel_ref(L)  # [H, L]
    idx = torch.arange(L)
    lag = idx[:, None] - idx[None, :]  # [L, L] t - s
    toeplitz = torch.where(lag >= 0, K[:, lag.clamp(min=0)], 0.0)  # [H, L, L]
    return _finish(ssm, uf, torch.einsum("hts,bhs->bht", toeplitz, uf), state, u.dtype)


def recurrent_scan(u: torch.Tensor, ssm: S4DKernel, state: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence over the diagonal complex state (streaming and decoding)."""
    _check(u, ssm)
    Abar, Bbar, C = ssm.discrete()
    x = ssm.zero_state(u.shape[0], u.device) if state is None else state
    uf = u.float()
    ys = []
    for t in range(u.shape[-1]):
        x = Abar * x + Bbar * uf[:, :, t, None]  # [B, H, N/2]
        ys.append(2 * (x * C).sum(-1).real + ssm.D.float() * uf[:, :, t])
    return torch.stack(ys, dim=-1).to(u.dtype), x
