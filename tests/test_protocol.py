import pytest
import torch
from helpers import assert_close

from msrnn import StatefulLM, stream_logits, tensor_nbytes
from msrnn.errors import ConfigError
from msrnn.models import HFCausalLM


@pytest.mark.parametrize("chunks", [1, 7, 63, [5, 13, 1, 44]], ids=lambda c: f"chunks={c}")
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunked_stream_equals_full_forward(chunks, attn):
    from helpers import tiny

    model = tiny("llama", attn=attn)
    lm = HFCausalLM(model)
    assert isinstance(lm, StatefulLM)
    x = torch.randint(0, 384, (2, 63))  # odd length
    with torch.no_grad():
        full = model(x).logits.float()
        streamed = stream_logits(lm, x, chunks)
    assert_close(f"stream[{chunks}]", full, streamed, atol=1e-5)


def test_full_cache_state_bytes_grow_linearly(tiny_model):
    lm = HFCausalLM(tiny_model)
    cfg = tiny_model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    state = lm.init_state(3)
    assert lm.state_nbytes(state) == 0
    with torch.no_grad():
        _, state = lm.forward_chunk(torch.randint(0, 384, (3, 10)), state)
        assert lm.state_nbytes(state) == 3 * 10 * per_token
        _, state = lm.forward_chunk(torch.randint(0, 384, (3, 1)), state)
    assert lm.state_nbytes(state) == 3 * 11 * per_token
    assert state.seen == 11


def test_chunk_validation(tiny_model):
    lm = HFCausalLM(tiny_model)
    state = lm.init_state(2)
    with pytest.raises(ConfigError, match="batch size 1 but the state was made for 2"):
        lm.forward_chunk(torch.zeros(1, 4, dtype=torch.long), state)
    with pytest.raises(ConfigError, match="at least one token"):
        lm.forward_chunk(torch.zeros(2, 0, dtype=torch.long), state)
    with pytest.raises(ConfigError, match="2-D"):
        lm.forward_chunk(torch.zeros(4, dtype=torch.long), state)
    with pytest.raises(ConfigError, match=">= 1"):
        stream_logits(lm, torch.zeros(2, 4, dtype=torch.long), 0)


def test_tensor_nbytes_counts_shared_storage_once():
    a = torch.zeros(10, dtype=torch.float32)
    assert tensor_nbytes({"x": a, "y": [a, torch.zeros(3, dtype=torch.int64)]}) == 40 + 24


@pytest.mark.parametrize("family", ["full", "tova", "supra", "bst", "rmt"])
def test_prefill_computes_the_last_logits_only_and_equals_the_full_stream(family, task_tokenizer):
    """``last_only`` (what prefill, the probes and the task scorer read with) gives the last row of the full
    stream's logits and the same state, at odd lengths across chunk, block and segment boundaries; the head runs
    on one position per chunk (counted on the lm_head's input rows)."""
    from test_longctx import _families

    from msrnn.protocol import fork_state, prefill, split, stream_chunks

    lm = _families(task_tokenizer)[family]
    model = getattr(lm, "model", None) or lm.wrapper.model
    head = model.get_output_embeddings()
    rows = []
    hook = head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    x = torch.randint(3, 300, (2, 45))
    with torch.inference_mode():
        state = lm.init_state(2)
        _, state = lm.forward_chunk(x[:, :7], state)  # an odd offset into blocks and segments
        want_state = fork_state(state)
        rows.clear()
        full_steps = list(stream_chunks(lm, split(x[:, 7:], 11), want_state))
        want = full_steps[-1].logits[:, -1]
        full_rows = sum(rows)
        rows.clear()
        got, got_state = prefill(lm, x[:, 7:], 11, state)
    hook.remove()
    assert got.shape == (2, lm.vocab_size)
    assert_close(f"{family} last logits", want, got, atol=1e-5)
    # The head ran on one row per sequence per chunk (RMT: per segment piece and memory write), not on all 38.
    assert full_rows >= 2 * 38 and sum(rows) <= 2 * 14 < full_rows, (rows, full_rows)
    with torch.inference_mode():  # the states are equal: the next token's logits agree
        nxt = x[:, :1]
        a = lm.forward_chunk(nxt, full_steps[-1].state)[0]
        b = lm.forward_chunk(nxt, got_state)[0]
    assert_close(f"{family} state after", a, b, atol=1e-5)


def test_an_adapter_without_last_only_is_still_driven():
    """An adapter written elsewhere whose forward_chunk has no ``last_only`` gets its last row sliced off."""
    from msrnn.protocol import prefill, takes_last_only

    class Plain:
        vocab_size = 5

        def init_state(self, batch_size):
            return {"n": 0}

        def forward_chunk(self, ids, state):
            state["n"] += ids.shape[1]
            return torch.arange(ids.shape[1] * 5, dtype=torch.float32).view(1, -1, 5), state

        def state_nbytes(self, state):
            return 0

    lm = Plain()
    assert not takes_last_only(lm)
    logits, state = prefill(lm, torch.zeros(1, 9, dtype=torch.long), 4)
    assert state["n"] == 9 and logits.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0]]  # the last chunk holds one token
