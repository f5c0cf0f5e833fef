"""RMT core: the wrapper equals a hand-written segment loop, truncated BPTT really truncates, streaming equals the
wrapper, memory bytes stay constant."""

import pytest
import torch
from helpers import V, assert_close, assert_generate_follows_protocol, assert_pipeline_generates, tiny

from msrnn.errors import ConfigError
from msrnn.protocol import stream_logits
from msrnn.rmt import RMTLM, MemoryWrapper, RMTConfig


def make(bptt=-1, arch="llama", m=3, S=8):
    return MemoryWrapper.wrap(tiny(arch, seed=2), num_memory_tokens=m, segment_length=S, bptt_depth=bptt)


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_round_trip_keeps_memory_and_backbone(tmp_path, arch, task_tokenizer):
    from transformers import AutoModel

    from msrnn.models import load_lm

    w = make(arch=arch).eval()
    with torch.no_grad():
        w.memory.add_(0.5)  # differs from any fresh init
    w.save_pretrained(tmp_path / "rmt")
    task_tokenizer.save_pretrained(str(tmp_path / "rmt"))
    w2 = AutoModel.from_pretrained(tmp_path / "rmt").eval()
    assert type(w2) is MemoryWrapper and torch.equal(w.memory, w2.memory)
    x = torch.randint(0, V, (2, 21))
    with torch.no_grad():
        assert torch.equal(w(x)["logits"], w2(x)["logits"])
        lm = load_lm(tmp_path / "rmt")
        assert isinstance(lm, RMTLM)
        assert_close("loaded stream", w(x)["logits"], stream_logits(lm, x, 5), atol=1e-4)


def test_final_logits_equal_the_stream_and_mixed_lengths_equal_each_alone():
    w = make(m=2, S=8).eval()
    a, b = torch.randint(0, V, (1, 24)), torch.randint(0, V, (1, 13))  # 3 segments; 2 segments (short first)
    with torch.no_grad():
        logits, _ = RMTLM(w).forward_chunk(a, RMTLM(w).init_state(1))
        assert_close("final vs stream", logits[:, -1], w.final_logits(a), atol=1e-4)
        batch = torch.zeros(2, 24, dtype=torch.long)
        mask = torch.zeros(2, 24, dtype=torch.long)
        batch[0], mask[0] = a[0], 1
        batch[1, 11:], mask[1, 11:] = b[0], 1
        both = w.final_logits(batch, mask)
        assert_close("a in batch", w.final_logits(a), both[:1], atol=1e-4)
        assert_close("b in batch", w.final_logits(b), both[1:], atol=1e-4)


def test_bad_configs():
    with pytest.raises(ConfigError, match="num_memory_tokens must be >= 1"):
        RMTConfig(num_memory_tokens=0)
    with pytest.raises(ConfigError, match="bptt_depth"):
        RMTConfig(bptt_depth=0)
    with pytest.raises(ConfigError, match="exceeds the model's 512 positions"):
        MemoryWrapper.wrap(tiny("llama"), num_memory_tokens=16, segment_length=500)
    with pytest.raises(ConfigError, match="not a causal LM"):
        MemoryWrapper.wrap(_tiny_bert())


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    return BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).eval()


class _Tok:
    cls_token_id, sep_token_id, pad_token_id = 1, 2, 0


def make_encoder(bptt=-1):
    from msrnn.rmt import MemoryEncoderClassifier

    return MemoryEncoderClassifier.wrap(_tiny_bert(), _Tok(), ["a", "b", "c"], num_memory_tokens=3,
                                        segment_length=10, bptt_depth=bptt).eval()


def test_encoder_mixed_lengths_equal_each_alone_and_memory_matters():
    enc = make_encoder()
    a, b = torch.randint(3, V, (1, 30)), torch.randint(3, V, (1, 17))
    with torch.no_grad():
        batch = torch.zeros(2, 30, dtype=torch.long)
        mask = torch.zeros(2, 30, dtype=torch.long)
        batch[0], mask[0] = a[0], 1
        batch[1, 13:], mask[1, 13:] = b[0], 1
        both = enc(batch, mask)["logits"]
        assert_close("a", enc(a)["logits"], both[:1], atol=1e-5)
        assert_close("b", enc(b)["logits"], both[1:], atol=1e-5)
        a2 = a.clone()
        a2[:, :10] = torch.randint(3, V, (1, 10))  # change only the first segment
        assert not torch.allclose(enc(a)["logits"], enc(a2)["logits"])  # it reaches the answer through memory


def test_encoder_truncated_bptt_and_round_trip(tmp_path):
    from transformers import AutoModel

    x, y = torch.randint(3, V, (1, 30)), torch.tensor([1])

    def first_grad(bptt):
        enc = make_encoder(bptt).train()
        captured = {}

        def hook(_, __, out):
            if "first" not in captured:
                out.retain_grad()
                captured["first"] = out
        enc.encoder.get_input_embeddings().register_forward_hook(hook)
        enc(x, labels=y)["loss"].backward()
        return captured["first"].grad

    assert first_grad(-1).abs().sum() > 0
    cut = first_grad(1)  # None: the first segment is not in the loss's graph at all
    assert cut is None or torch.count_nonzero(cut) == 0
    enc = make_encoder()
    enc.save_pretrained(tmp_path / "enc")
    enc2 = AutoModel.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        assert torch.equal(enc(x)["logits"], enc2(x)["logits"])


def test_eval_ppl_on_an_encoder_rmt_is_a_clear_error(tmp_path, task_tokenizer, capsys):
    from msrnn.cli.main import main

    make_encoder().save_pretrained(tmp_path / "enc")
    task_tokenizer.save_pretrained(str(tmp_path / "enc"))
    assert main(["eval", "ppl", "--model", str(tmp_path / "enc")]) == 2
    err = capsys.readouterr().err
    assert "classifier without next-token logits" in err and "msrnn eval task" in err


def test_stream_bench_plumbing():
    from msrnn.bench.stream import stream_bench

    res = stream_bench(RMTLM(make(m=2, S=4).eval()), tokens=64, chunk=8, samples=4)
    assert res["tokens"] == 64 and res["nonfinite"] == 0 and len(res["rows"]) == 4
    assert len({r["state_bytes"] for r in res["rows"]}) == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_rmt_generate_and_pipeline_follow_msrnn_generate(arch, tmp_path, task_tokenizer):
    """generate() streams through the memory in a StateCache (segments of 8 tokens, so the 13-token prompt and the
    12 new tokens cross three segment ends); greedy output equals `msrnn generate`; pipeline runs on a saved dir."""
    m = MemoryWrapper.wrap(tiny(arch, seed=2), num_memory_tokens=3, segment_length=8).eval()
    x = torch.randint(1, V, (2, 13))
    assert_generate_follows_protocol(m, RMTLM(m), x)
    with pytest.raises(TypeError, match="unexpected"):
        m(x, position_ids=torch.arange(13)[None])  # the parallel form takes no stray arguments
    assert len(task_tokenizer) <= V
    big = MemoryWrapper.wrap(tiny(arch, seed=3), num_memory_tokens=2, segment_length=8)
    assert_pipeline_generates(big, task_tokenizer, tmp_path / "m")
