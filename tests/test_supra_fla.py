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
