"""RMT core: the wrapper equals a hand-written segment loop, truncated BPTT really truncates, streaming equals the
wrapper, memory bytes stay constant."""

import pytest
import torch
from helpers import V, assert_close, tiny

from msrnn.errors import ConfigError
from msrnn.protocol import stream_logits
from msrnn.rmt import RMTLM, MemoryWrapper, RMTConfig


def make(bptt=-1, arch="llama", m=3, S=8):
    return MemoryWrapper(tiny(arch, seed=2), RMTConfig(num_memory_tokens=m, segment_length=S, bptt_depth=bptt))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wrapper_equals_a_hand_written_segment_loop(arch):
    w = make(arch=arch).eval()
    x = torch.randint(0, V, (2, 30))  # 4 segments, the last one short
    with torch.no_grad():
        got = w(x)["logits"]
        emb = w.model.get_input_embeddings()
        mem, ref = w.memory[None].expand(2, -1, -1), []
        for s in range(0, 30, 8):
            seg = x[:, s : s + 8]
            h = torch.cat([mem, emb(seg), mem], 1)
            out = w.model(inputs_embeds=h, position_ids=torch.arange(h.shape[1])[None].expand(2, -1),
                          output_hidden_states=True)
            ref.append(out.logits[:, 3 : 3 + seg.shape[1]])
            mem = out.hidden_states[-1][:, -3:]
    assert_close("segments", torch.cat(ref, 1), got, atol=1e-5)


def _first_segment_grad(bptt):
    w = make(bptt=bptt)
    x = torch.randint(0, V, (1, 24))  # 3 segments
    emb = w.model.get_input_embeddings()
    captured = {}

    def hook(_, __, out):
        if "first" not in captured:
            out.retain_grad()
            captured["first"] = out
    handle = emb.register_forward_hook(hook)
    labels_mask = torch.zeros(1, 24, dtype=torch.bool)
    labels_mask[:, 17:] = True  # loss on the last segment only
    w(x, labels=x, labels_mask=labels_mask)["loss"].backward()
    handle.remove()
    return captured["first"].grad


def test_truncated_bptt_really_stops_gradients():
    assert _first_segment_grad(-1).abs().sum() > 0
    assert torch.count_nonzero(_first_segment_grad(1)) == 0
    assert torch.count_nonzero(_first_segment_grad(2)) == 0  # last 2 segments connected: not the first of 3
    assert _first_segment_grad(3).abs().sum() > 0


@pytest.mark.parametrize("chunks", [1, 5, 13, 40])
def test_streaming_equals_wrapper(chunks):
    w = make().eval()
    x = torch.randint(0, V, (2, 37))
    with torch.no_grad():
        assert_close(f"stream {chunks}", w(x)["logits"], stream_logits(RMTLM(w), x, chunks), atol=1e-4)


def test_memory_bytes_constant_over_100_segments():
    w = make(m=2, S=4).eval()
    lm = RMTLM(w)
    state, sizes = lm.init_state(1), []
    with torch.no_grad():
        for _ in range(100):
            _, state = lm.forward_chunk(torch.randint(0, V, (1, 4)), state)
            sizes.append(lm.state_nbytes(state))
    assert len(set(sizes)) == 1 and sizes[0] == 2 * 64 * 4  # memory only between segments: m x d fp32
    assert torch.isfinite(state.memory).all()


def test_save_and_restore_memory_parameter(tmp_path):
    w = make()
    torch.save(w.state_dict(), tmp_path / "rmt.pt")
    w2 = make()
    w2.load_state_dict(torch.load(tmp_path / "rmt.pt"))
    assert torch.equal(w.memory, w2.memory)


def test_bad_configs():
    with pytest.raises(ConfigError, match="num_memory_tokens must be >= 1"):
        RMTConfig(num_memory_tokens=0)
    with pytest.raises(ConfigError, match="bptt_depth"):
        RMTConfig(bptt_depth=0)
    with pytest.raises(ConfigError, match="exceeds the model's 512 positions"):
        MemoryWrapper(tiny("llama"), RMTConfig(num_memory_tokens=16, segment_length=500))


def test_stream_bench_plumbing():
    from msrnn.bench.stream import stream_bench

    res = stream_bench(RMTLM(make(m=2, S=4).eval()), tokens=64, chunk=8, samples=4)
    assert res["tokens"] == 64 and res["nonfinite"] == 0 and len(res["rows"]) == 4
    assert len({r["state_bytes"] for r in res["rows"]}) == 1
