"""The three forms of decayed linear attention agree: outputs, final state and gradients, with a carried state."""

import math

import pytest
import torch
from helpers import assert_close

from msrnn.errors import ConfigError
from msrnn.supra import chunked, chunked_ref, log_decay, recurrent_step


def inputs(B=2, H=3, T=63, Dk=60, Dv=60, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for d in (Dk, Dk, Dv))
    s0 = torch.randn(B, H, Dk, Dv, generator=g) * 0.1
    if requires_grad:
        for t in (q, k, v, s0):
            t.requires_grad_(True)
    return q, k, v, s0


def masked_parallel(q, k, v, lg, scale, s0):
    """An O(T^2) third derivation: (Q K^T * D) V plus the decayed initial state."""
    T = q.shape[2]
    i = torch.arange(T, dtype=torch.float64)
    rel = i[:, None] - i[None, :]
    D = torch.where(rel >= 0, (lg.double()[:, None, None] * rel.clamp(min=0)).exp(), 0.0)  # [H, T, T]
    qd, kd, vd = q.double(), k.double() * scale, v.double()
    o = torch.matmul(torch.matmul(qd, kd.transpose(-1, -2)) * D, vd)
    o = o + (lg.double()[:, None, None] * (i + 1)[:, None]).exp() * torch.matmul(qd, s0.double())
    return o


@pytest.mark.parametrize("decay", ["lightning", "retnet", "none"])
@pytest.mark.parametrize("chunk", [1, 16, 64, 100])
def test_chunked_equals_naive_with_carried_state(decay, chunk):
    q, k, v, s0 = inputs()
    lg = log_decay(3, decay)
    o_ref, s_ref = chunked_ref(q, k, v, lg, initial_state=s0)
    o, s = chunked(q, k, v, lg, initial_state=s0, chunk_size=chunk)
    assert_close(f"o[{decay},{chunk}]", o_ref, o, atol=1e-5, rtol=1e-5)
    assert_close(f"state[{decay},{chunk}]", s_ref, s, atol=1e-4, rtol=1e-5)
    par = masked_parallel(q, k, v, lg, 1 / math.sqrt(60), s0)
    assert_close("masked parallel", par, o.double(), atol=1e-4, rtol=1e-5)


def test_split_stream_equals_one_pass_and_step_by_step():
    q, k, v, s0 = inputs(T=50)
    lg = log_decay(3)
    o_all, s_all = chunked(q, k, v, lg, initial_state=s0, chunk_size=16)
    o1, s1 = chunked(q[:, :, :23], k[:, :, :23], v[:, :, :23], lg, initial_state=s0, chunk_size=16)
    o2, s2 = chunked(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], lg, initial_state=s1, chunk_size=16)
    assert_close("split", o_all, torch.cat([o1, o2], 2), atol=1e-5, rtol=1e-5)
    assert_close("split state", s_all, s2, atol=1e-4, rtol=1e-5)
    s, outs = s0, []
    for t in range(50):
        o, s = recurrent_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], lg, state=s)
        outs.append(o)
    assert_close("steps", o_all, torch.cat(outs, 2), atol=1e-5, rtol=1e-5)


def test_gradients_agree():
    q, k, v, s0 = inputs(T=63, requires_grad=True)
    lg = log_decay(3)
    grads = []
    for fn in (lambda: chunked_ref(q, k, v, lg, initial_state=s0),
               lambda: chunked(q, k, v, lg, initial_state=s0, chunk_size=16)):
        o, s = fn()
        loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum() + (s * 0.3).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v, s0)))
    for name, a, b in zip(("dq", "dk", "dv", "ds0"), *grads, strict=True):
        assert_close(name, a, b, atol=1e-4, rtol=1e-4)


def test_bf16_inputs_keep_fp32_state():
    q, k, v, s0 = inputs(T=20)
    o, s = chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_decay(3), initial_state=s0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_decay_schedules():
    lg = log_decay(32, "lightning")
    gam = lg.exp()
    assert gam[-1] == pytest.approx(math.exp(-1 / 256), rel=1e-6)  # max gamma is exp(-2^-8) for any H
    assert gam[0] == pytest.approx(math.exp(-(2 ** (-8 / 32))), rel=1e-6)
    assert (log_decay(4, "retnet").exp() - torch.tensor([1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7, 1 - 2 ** -8])
            ).abs().max() < 1e-6
    with pytest.raises(ConfigError, match="unknown decay schedule"):
        log_decay(4, "cosine")


def test_bad_shapes():
    q, k, v, s0 = inputs(T=5)
    with pytest.raises(ConfigError, match="one value per head"):
        chunked(q, k, v, log_decay(4))
    with pytest.raises(ConfigError, match="state must be"):
        chunked(q, k, v, log_decay(3), initial_state=s0[:, :, :4])
    with pytest.raises(ConfigError, match="one token"):
        recurrent_step(q, k, v, log_decay(3))


def test_several_blocks_equal_naive_outputs_state_and_gradients():
    # chunk 8, 2 chunks per block: T=63 crosses 4 blocks (the last one partial) and ends in a short chunk,
    # so the state hand-off between blocks is exercised.
    q, k, v, s0 = inputs(T=63, requires_grad=True)
    lg = log_decay(3)
    results = []
    for fn in (lambda: chunked_ref(q, k, v, lg, initial_state=s0),
               lambda: chunked(q, k, v, lg, initial_state=s0, chunk_size=8, block_chunks=2)):
        o, s = fn()
        loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum() + (s * 0.3).sum()
        results.append((o.detach(), s.detach(), torch.autograd.grad(loss, (q, k, v, s0))))
    (o_ref, s_ref, g_ref), (o, s, g) = results
    assert_close("o", o_ref, o, atol=1e-5, rtol=1e-5)
    assert_close("state", s_ref, s, atol=1e-4, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "ds0"), g_ref, g, strict=True):
        assert_close(name, a, b, atol=1e-4, rtol=1e-4)


def test_feature_width_differs_from_value_width():
    """SUPRA's feature_dim makes Dk != Dv: chunked equals the naive recurrence in outputs, state and gradients."""
    q, k, v, s0 = inputs(T=63, Dk=24, Dv=60, requires_grad=True)
    lg = log_decay(3)
    results = []
    for fn in (lambda: chunked_ref(q, k, v, lg, initial_state=s0),
               lambda: chunked(q, k, v, lg, initial_state=s0, chunk_size=16)):
        o, s = fn()
        loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum() + (s * 0.3).sum()
        results.append((o.detach(), s.detach(), torch.autograd.grad(loss, (q, k, v, s0))))
    (o_ref, s_ref, g_ref), (o, s, g) = results
    assert s.shape == (2, 3, 24, 60)
    assert_close("o", o_ref, o, atol=1e-5, rtol=1e-5)
    assert_close("state", s_ref, s, atol=1e-4, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "ds0"), g_ref, g, strict=True):
        assert_close(name, a, b, atol=1e-4, rtol=1e-4)
