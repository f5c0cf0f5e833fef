"""S4D: direct convolution == FFT convolution == recurrent scan, with carried state, odd lengths, gradients."""

import pytest
import torch
from helpers import assert_close

from msrnn.errors import ConfigError
from msrnn.ssm import S4DKernel, direct_conv, fft_conv, recurrent_scan


def make(H=6, N=16, seed=0):
    torch.manual_seed(seed)
    return S4DKernel(H, state_size=N)


@pytest.mark.parametrize("L", [1, 63, 100])
def test_three_forms_agree_with_carried_state(L):
    ssm = make()
    u = torch.randn(2, 6, L)
    x0 = torch.randn(2, 6, 8, dtype=torch.cfloat) * 0.3
    y_ref, s_ref = direct_conv(u, ssm, x0)
    for fn in (fft_conv, recurrent_scan):
        y, s = fn(u, ssm, x0)
        assert_close(f"{fn.__name__} y L={L}", y_ref, y, atol=1e-4, rtol=1e-4)
        assert_close(f"{fn.__name__} state L={L}", torch.view_as_real(s_ref), torch.view_as_real(s), atol=1e-4,
                     rtol=1e-4)


def test_split_stream_equals_one_pass():
    ssm = make()
    u = torch.randn(1, 6, 90)
    y, s = fft_conv(u, ssm)
    y1, s1 = fft_conv(u[..., :37], ssm)
    y2, s2 = recurrent_scan(u[..., 37:], ssm, s1)
    assert_close("split y", y, torch.cat([y1, y2], -1), atol=1e-4, rtol=1e-4)
    assert_close("split state", torch.view_as_real(s), torch.view_as_real(s2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("L", [1, 7, 300, 1000])
def test_split_power_kernel_equals_the_vandermonde_reference(L):
    ssm = make()
    assert_close(f"kernel L={L}", ssm.kernel_reference(L), ssm.kernel(L), atol=1e-5, rtol=1e-4)


def test_gradients_agree_fft_vs_direct():
    ssm = make()
    u = torch.randn(2, 6, 40, requires_grad=True)
    grads = []
    for fn in (direct_conv, fft_conv):
        ssm.zero_grad()
        y, _ = fn(u, ssm)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        grads.append([u.grad.clone()] + [p.grad.clone() for p in ssm.parameters()])
        u.grad = None
    for i, (a, b) in enumerate(zip(*grads, strict=True)):
        assert_close(f"grad {i}", a, b, atol=1e-3, rtol=1e-3)


def test_fp32_under_bf16_and_long_stream_is_finite():
    ssm = make()
    y, s = fft_conv(torch.randn(1, 6, 4096).bfloat16(), ssm)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.cfloat and torch.isfinite(y.float()).all()
    x = None
    for _ in range(16):  # 16 x 8192 = 131k tokens through the carried state
        _, x = fft_conv(torch.randn(1, 6, 8192), ssm, x)
    assert torch.isfinite(torch.view_as_real(x)).all()


def test_bad_arguments():
    with pytest.raises(ConfigError, match="even"):
        S4DKernel(4, state_size=7)
    with pytest.raises(ConfigError, match="expected u"):
        fft_conv(torch.randn(1, 5, 10), make())


def _fir_direct(u, filt):
    """y_t = sum_{s<=t} K_{t-s} u_s + D u_t with K zero past the filter's taps, written as a loop."""
    L = u.shape[-1]
    K = filt.kernel(L)
    y = torch.zeros_like(u)
    for t in range(L):
        for s in range(t + 1):
            y[..., t] = y[..., t] + K[:, t - s] * u[..., s]
    return y + u * filt.D[:, None]


def test_unstructured_filter_fft_equals_a_direct_loop_with_carried_state_and_gradients():
    from msrnn.ssm import UnstructFilter, fir_conv

    torch.manual_seed(0)
    filt = UnstructFilter(channels=5, length=12)
    u = torch.randn(2, 5, 31, requires_grad=True)
    ref = _fir_direct(u, filt)
    y, state = fir_conv(u, filt)
    assert_close("fir fft", ref, y, atol=1e-5)
    assert_close("fir state", u[..., -11:], state, atol=0)  # the last length-1 inputs
    y1, s1 = fir_conv(u[..., :13], filt)
    y2, _ = fir_conv(u[..., 13:], filt, s1)
    assert_close("fir split", ref, torch.cat([y1, y2], -1), atol=1e-5)
    w = torch.linspace(-1, 1, 31)
    g_ref = torch.autograd.grad((ref * w).sum(), [u, *filt.parameters()])
    g = torch.autograd.grad((fir_conv(u, filt)[0] * w).sum(), [u, *filt.parameters()])
    for i, (a, b) in enumerate(zip(g_ref, g, strict=True)):
        assert_close(f"fir grad {i}", a, b, atol=1e-4, rtol=1e-4)
