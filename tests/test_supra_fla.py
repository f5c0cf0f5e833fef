"""flash-linear-attention backend: plumbing checked on CPU against fla's own PyTorch reference when fla is
installed; the Triton kernel itself against our torch forms on a GPU."""

import pytest
import torch
from helpers import assert_close
from test_supra_ops import inputs

from msrnn.errors import ConfigError
from msrnn.supra import chunked, fla_chunked, log_decay, resolve_backend
from msrnn.supra.ops import fla_available

needs_fla = pytest.mark.skipif(not fla_available(), reason="flash-linear-attention is not installed")
needs_cuda_fla = pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()),
                                    reason="the fla Triton kernels need CUDA and flash-linear-attention")


def naive_fla_kernel(q, k, v, g_gamma, scale, initial_state, output_final_state):
    """fla's pure-PyTorch simple-GLA reference behind the chunk_simple_gla signature."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    g = g_gamma[None, None].expand(q.shape[0], q.shape[1], -1).contiguous()  # [B, T, H] per-token log decay
    return naive_recurrent_simple_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state)


@needs_fla
@pytest.mark.parametrize("decay", ["lightning", "retnet"])
def test_fla_conventions_match_ours_on_cpu(decay):
    q, k, v, s0 = inputs(T=63)
    lg = log_decay(3, decay)
    o_ref, s_ref = chunked(q, k, v, lg, initial_state=s0)
    o, s = fla_chunked(q, k, v, lg, initial_state=s0, kernel=naive_fla_kernel)
    assert_close("o", o_ref, o, atol=1e-4, rtol=1e-4)
    assert_close("state", s_ref, s, atol=1e-4, rtol=1e-4)


@needs_cuda_fla
def test_fla_triton_kernel_matches_torch_forms_on_gpu():
    q, k, v, s0 = (t.cuda() for t in inputs(T=300, Dk=64, Dv=64))
    lg = log_decay(3).cuda()
    o_ref, s_ref = chunked(q, k, v, lg, initial_state=s0)
    o, s = fla_chunked(q, k, v, lg, initial_state=s0)
    assert_close("o", o_ref, o, atol=2e-3, rtol=2e-3)
    assert_close("state", s_ref, s, atol=2e-3, rtol=2e-3)


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_backend("fla", cpu)
    with pytest.raises(ConfigError, match="unknown linear-attention backend"):
        resolve_backend("cuda", cpu)


def contract_kernel(q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens=None):
    """fla's variable-length contract as msrnn reads it (FlashAttention's cu_seqlens over one [1, N, H, D] batch; a
    state per sequence, divided by ``scale``), computed with msrnn's reference loop: the stand-in for the Triton
    kernel on a CPU. The GPU test below holds the real kernel to the same check."""
    from msrnn.supra import chunked_ref

    assert q.shape[0] == 1 and cu_seqlens is not None
    o = torch.empty(*q.shape[:3], v.shape[-1])
    states = []
    for n, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        h0 = None if initial_state is None else initial_state[n : n + 1] * scale
        on, sn = chunked_ref(*(x[:, a:b].transpose(1, 2) for x in (q, k, v)), g_gamma, scale, h0)
        o[:, a:b] = on.transpose(1, 2)
        states.append(sn / scale)
    return o, torch.cat(states)


def test_packed_documents_through_fla_varlen_equal_the_torch_scan(caplog):
    from msrnn.supra.ops import fla_varlen_failure

    q, k, v, s0 = inputs(T=50)
    lg = log_decay(3, "retnet")
    resets = torch.zeros(2, 50, dtype=torch.bool)
    resets[0, [1, 20]] = True
    resets[1, [0, 49]] = True
    o_ref, s_ref = chunked(q, k, v, lg, initial_state=s0, resets=resets)
    assert fla_varlen_failure(contract_kernel, q.device) is None
    o, s = fla_chunked(q, k, v, lg, initial_state=s0, kernel=contract_kernel, resets=resets)
    assert_close("o", o_ref, o, atol=1e-4, rtol=1e-4)
    assert_close("state", s_ref, s, atol=1e-4, rtol=1e-4)

    def one_sequence(q, k, v, g_gamma, scale, initial_state, output_final_state, cu_seqlens=None):
        """A kernel that takes cu_seqlens but runs everything as one sequence (a state for each, all the same)."""
        o, s = contract_kernel(q, k, v, g_gamma, scale, None if initial_state is None else initial_state[:1],
                               output_final_state, cu_seqlens[[0, -1]])
        return o, s.expand(len(cu_seqlens) - 1, -1, -1, -1)

    def no_varlen(q, k, v, g_gamma, scale, initial_state, output_final_state):  # an fla without cu_seqlens
        raise AssertionError("not called with cu_seqlens")

    for kernel, why in ((one_sequence, "differ by"), (no_varlen, "TypeError")):
        with caplog.at_level("WARNING"):
            o, s = fla_chunked(q, k, v, lg, initial_state=s0, kernel=kernel, resets=resets)
        assert why in fla_varlen_failure(kernel, q.device) and "fla_varlen_equals_chunked" in caplog.text
        assert_close("o", o_ref, o, atol=1e-5, rtol=1e-5)  # the check failed: the torch scan ran
        assert_close("state", s_ref, s, atol=1e-5, rtol=1e-5)


@needs_cuda_fla
def test_fla_varlen_kernel_passes_the_check_on_gpu():
    from fla.ops.simple_gla import chunk_simple_gla

    from msrnn.supra.ops import fla_varlen_failure

    assert fla_varlen_failure(chunk_simple_gla, torch.device("cuda")) is None
