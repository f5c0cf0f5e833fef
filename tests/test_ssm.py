"""S4D: direct convolution == FFT convolution == recurrent scan, with carried state, odd lengths, gradients."""

import pytest
import torch
from helpers import assert_close

from msrnn.errors import ConfigError
from msrnn.ssm import S4DKernel, fft_conv, fft_conv_ref, recurrent_scan


def make(H=6, N=16, seed=0):
    torch.manual_seed(seed)
    return S4DKernel(H, state_size=N)


@pytest.mark.parametrize("L", [1, 63, 100])
def test_three_forms_agree_with_carried_state(L):
    ssm = make()
    u = torch.randn(2, 6, L)
    x0 = torch.randn(2, 6, 8, dtype=torch.cfloat) * 0.3
    y_ref, s_ref = fft_conv_ref(u, ssm, x0)
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
    assert_close(f"kernel L={L}", ssm.kernel_ref(L), ssm.kernel(L), atol=1e-5, rtol=1e-4)


def test_gradients_agree_fft_vs_direct():
    ssm = make()
    u = torch.randn(2, 6, 40, requires_grad=True)
    grads = []
    for fn in (fft_conv_ref, fft_conv):
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


# ---------------------------------------------------------------- an independent reference: exact ZOH in float64
def _zoh_reference(ssm: S4DKernel, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K [H, L], Abar [H, N/2, 2, 2], Bbar [H, N/2, 2]) in float64 from matrix exponentials, sharing nothing with
    ``discrete()``: each complex mode x' = a x + u (B = 1, folded into C) as the real system
    d/dt [xr, xi] = [[ar, -ai], [ai, ar]] [xr, xi] + [1, 0] u. Zero-order hold over dt is the exponential of the
    augmented matrix [[dt A, dt B], [0, 0]] = [[Abar, Bbar], [0, 1]], and Abar^l = exp(l dt A) is its own
    matrix exponential for every l (no repeated products, so no error grows with l)."""
    H, M = ssm.channels, ssm.modes
    ar = -ssm.log_A_real.detach().double().exp()
    ai = ssm.A_imag.detach().double()
    dt = ssm.log_dt.detach().double().exp()[:, None].expand(H, M)
    A = torch.stack([torch.stack([ar, -ai], -1), torch.stack([ai, ar], -1)], -2)  # [H, M, 2, 2]
    aug = torch.zeros(H, M, 3, 3, dtype=torch.float64)
    aug[..., :2, :2] = dt[..., None, None] * A
    aug[..., 0, 2] = dt
    E = torch.linalg.matrix_exp(aug)
    Abar, Bbar = E[..., :2, :2], E[..., :2, 2]  # [H, M, 2, 2], [H, M, 2]
    C = ssm.C.detach().double()  # [H, M, 2] = (Re, Im)
    K = torch.empty(H, L, dtype=torch.float64)
    for start in range(0, L, 4096):  # Abar^l for a slab of l at a time (bounded memory at L = 16k)
        ls = torch.arange(start, min(L, start + 4096), dtype=torch.float64)
        powers = torch.linalg.matrix_exp(ls[:, None, None, None, None] * (dt[..., None, None] * A))  # [l, H, M, 2, 2]
        x = powers @ Bbar[..., None]  # [l, H, M, 2, 1]: the state l steps after a unit input
        # y = 2 Re(C x) = 2 (Cr xr - Ci xi), summed over modes
        K[:, start : start + len(ls)] = (2 * (C[..., 0] * x[..., 0, 0] - C[..., 1] * x[..., 1, 0])).sum(-1).T
    return K, Abar, Bbar


def _conv64(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    L = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]


def test_fast_s4d_equals_an_exact_float64_discretisation_at_16k():
    """Kernel, outputs and final state of the fp32 fast path against matrix-exponential ZOH in float64, L = 16,384
    (dt from the ends of the S4D range and half the modes decaying slowly, so the kernel still matters 16k steps
    later: its tail is ~1% of its peak)."""
    L = 16_384
    ssm = make(H=4, N=16, seed=3)
    with torch.no_grad():
        ssm.log_dt.copy_(torch.log(torch.tensor([1e-3, 3e-3, 1e-2, 1e-1])))
        ssm.log_A_real[:, ::2] = torch.log(torch.tensor(0.02))  # Re(A) = -0.02 on every other mode
    K64, Abar64, Bbar64 = _zoh_reference(ssm, L)
    assert K64[:, -100:].abs().max() > 1e-3 * K64.abs().max()  # the far end of the kernel is not negligible
    K = ssm.kernel(L).double()
    scale = K64.abs().max()
    assert (K - K64).abs().max() / scale < 5e-5, (K - K64).abs().max() / scale
    # Per-mode discretisation: the fast path's complex Abar, Bbar against the real 2x2 forms.
    Abar, Bbar, _ = ssm.discrete()
    assert torch.allclose(torch.view_as_real(Abar).double(), Abar64[..., :, 0], atol=1e-6)
    assert torch.allclose(torch.view_as_real(Bbar).double(), Bbar64, atol=1e-6)
    torch.manual_seed(0)
    u = torch.randn(1, 4, L)
    y, state = fft_conv(u, ssm)
    y64 = _conv64(u.double(), K64) + u.double() * ssm.D.detach().double()[:, None]
    assert (y.double() - y64).pow(2).mean().sqrt() / y64.pow(2).mean().sqrt() < 1e-4
    # Final state x_L = sum_m Abar^m Bbar u_(L-1-m), by the exact recurrence in float64 on the real 2x2 form.
    x = torch.zeros(4, 8, 2, dtype=torch.float64)
    u64 = u[0].double()
    for t in range(L):
        x = (Abar64 @ x[..., None])[..., 0] + Bbar64 * u64[:, t, None, None]
    ref_state = torch.view_as_complex(x.contiguous())
    err = (state[0].cdouble() - ref_state).abs().max() / ref_state.abs().max()
    assert err < 1e-4, err


# ---------------------------------------------------------------- the S4 recipe: fp32 parameters, optimiser groups
def test_ssm_parameters_stay_fp32_under_to_and_half_and_refuse_a_forced_cast():
    from msrnn.ssm import UnstructFilter

    for module in (make(), UnstructFilter(6, 16)):
        ref = {n: p.detach().clone() for n, p in module.named_parameters()}
        for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
            cast(module)
            for n, p in module.named_parameters():
                assert p.dtype == torch.float32 and torch.equal(p.detach(), ref[n]), n
        module.double()  # widening is allowed (float64 references)
        assert all(p.dtype == torch.float64 for p in module.parameters())
        module.float()
        next(module.parameters()).data = next(module.parameters()).data.bfloat16()  # a path that bypasses _apply
        with pytest.raises(ConfigError, match="must run in fp32"):
            module.kernel(8)


def test_c_is_initialised_with_unit_variance_as_s4d():
    C = torch.view_as_complex(make(H=512, N=64, seed=1).C.detach())
    assert abs(C.abs().pow(2).mean().item() - 1.0) < 0.03


def test_trainer_gives_the_ssm_dynamics_the_s4_recipe():
    """dt and A: weight decay 0 and lr min(lr, 1e-3) (state-spaces/s4); C and D: the ordinary groups."""
    from msrnn.train.trainer import _param_groups

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ssm, self.proj = make(), torch.nn.Linear(6, 6)

    net = Net()
    by_param = {id(p): g for g in _param_groups(net, 0.1, 2e-3) for p in g["params"]}
    for name in ("log_dt", "log_A_real", "A_imag"):
        g = by_param[id(getattr(net.ssm, name))]
        assert g["weight_decay"] == 0.0 and g["lr"] == 1e-3, name
    assert by_param[id(net.ssm.C)]["weight_decay"] == 0.1 and by_param[id(net.ssm.C)]["lr"] == 2e-3
    assert by_param[id(net.proj.weight)]["weight_decay"] == 0.1
    assert by_param[id(net.ssm.D)]["weight_decay"] == 0.0 and by_param[id(net.proj.bias)]["weight_decay"] == 0.0
    small = {id(p): g for g in _param_groups(net, 0.1, 5e-4) for p in g["params"]}
    assert small[id(net.ssm.log_dt)]["lr"] == 5e-4  # a cap, never a raise
