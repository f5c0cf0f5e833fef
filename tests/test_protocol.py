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
