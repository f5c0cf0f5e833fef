"""Document-aware packing: positions restart at each document, every model trains with no state crossing a document
boundary (packed where the model honours restarting positions, a row per document otherwise), and the two forms give
the same loss and gradients."""

import numpy as np
import pytest
import torch
from helpers import V, tiny

from msrnn.data import LMBatches, document_rows
from msrnn.data.batches import IGNORE
from msrnn.data.tokens import TokenStream
from msrnn.supra.ops import chunked, chunked_ref, document_starts, log_decay
from msrnn.train.loss import ChunkedLMLoss
from msrnn.train.packing import DocumentBatches, position_reset_failure

EOS = 999


def _stream() -> TokenStream:
    lengths = [5, 0, 1, 9, 0, 0, 3, 12, 1, 7]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.random.default_rng(0).integers(1, 300, int(offsets[-1])).astype(np.uint16)
    return TokenStream(tokens, offsets, [str(i) for i in range(len(lengths))])


def _reference_positions(ids: np.ndarray) -> np.ndarray:
    """Positions by walking the window: 0 at its start and after every EOS (the EOS ends its document)."""
    pos, out = 0, []
    for tok in ids:
        out.append(pos)
        pos = 0 if tok == EOS else pos + 1
    return np.array(out)


def test_positions_restart_after_every_eos_and_first_tokens_are_not_targets():
    stream = _stream()
    docs = LMBatches(stream, seq_len=6, batch_size=4, eos_id=EOS, seed=1)
    flat = LMBatches(stream, seq_len=6, batch_size=4, eos_id=EOS, seed=1, packing="stream")
    total = int(stream.offsets[-1]) + len(stream) - 1
    for start in range(total - 6 + 1):  # every window, across empty documents and both ends
        ids = docs.joined(start, start + 6)
        np.testing.assert_array_equal(docs.positions(start, start + 6), _reference_positions(ids))
    seen_starts = 0
    for step in range(30):
        b, old = docs.batch(step), flat.batch(step)
        assert b["input_ids"].equal(old["input_ids"])  # the same windows as before packing existed
        assert set(old) == {"input_ids", "labels"} and old["labels"].equal(old["input_ids"])
        for row, pos in zip(b["input_ids"], b["position_ids"], strict=True):
            np.testing.assert_array_equal(pos.numpy(), _reference_positions(row.numpy()))
        starts = b["position_ids"] == 0
        starts[:, 0] = False
        seen_starts += int(starts.sum())
        assert (b["labels"][starts] == IGNORE).all()
        assert b["labels"][~starts].equal(b["input_ids"][~starts])
    assert seen_starts > 10


def test_repeat_rows_are_one_document():
    stream = _stream()
    b = LMBatches(stream, seq_len=8, batch_size=4, eos_id=EOS, repeat_fraction=0.5, seed=2).batch(0)
    assert b["position_ids"][:2].equal(torch.arange(8).expand(2, -1))  # the copy sees the original
    assert b["labels"][:2].equal(b["input_ids"][:2])


def test_document_rows_put_each_document_on_its_own_row():
    stream = _stream()
    b = LMBatches(stream, seq_len=9, batch_size=3, eos_id=EOS, seed=4).batch(3)
    rows = document_rows(b, pad_id=0)
    pieces = []
    for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
        n = int((ids != 0).sum())  # the stream's tokens are never 0, the padding is
        assert (ids[:n] != 0).all() and (labels[n:] == IGNORE).all()
        pieces.append((ids[:n], labels[:n]))
    assert torch.cat([p[0] for p in pieces]).equal(b["input_ids"].flatten())
    kept = torch.cat([p[1][1:] for p in pieces])  # what the loss scores: all but each row's first token
    targets = b["labels"].clone()
    targets[:, 0] = IGNORE
    assert kept[kept != IGNORE].equal(targets[targets != IGNORE])
    assert len(pieces) == int((b["position_ids"] == 0).sum())


@pytest.mark.parametrize("C,block", [(4, 2), (5, 3), (64, 1)])
def test_linear_attention_resets_agree_in_every_form(C, block):
    """The chunked form with document starts equals the reference loop (outputs, final state, gradients), and each
    document's outputs equal running it alone: nothing crosses a start, whatever the chunking."""
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 45, 5
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    lg = log_decay(H, "retnet")
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, [7, 8, 30]] = True  # a one-token document, a start mid-chunk
    resets[1, [0, 16, 44]] = True  # a start at 0 drops the carried state; one on the last token
    S0 = torch.randn(B, H, D, D)
    o1, s1 = chunked_ref(q, k, v, lg, initial_state=S0, resets=resets)
    o2, s2 = chunked(q, k, v, lg, initial_state=S0, resets=resets, chunk_size=C, block_chunks=block)
    torch.testing.assert_close(o2, o1, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=2e-5, rtol=1e-5)
    g1 = torch.autograd.grad((o1 ** 2).sum() + s1.sum(), (q, k, v))
    g2 = torch.autograd.grad((o2 ** 2).sum() + s2.sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for row, cuts in ((0, [0, 7, 8, 30, T]), (1, [0, 16, 44, T])):
        for a, e in zip(cuts[:-1], cuts[1:], strict=True):
            init = S0[row : row + 1] if a == 0 and not resets[row, 0] else None
            alone, _ = chunked_ref(q[row : row + 1, :, a:e], k[row : row + 1, :, a:e], v[row : row + 1, :, a:e], lg,
                                   initial_state=init)
            torch.testing.assert_close(o2[row : row + 1, :, a:e], alone, atol=2e-5, rtol=1e-5)


def test_document_starts_follow_transformers_rule():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 9, 10]])
    assert document_starts(pos, 2).tolist() == [[False, False, False, True, False, True], [False] * 6]
    assert document_starts(pos[1:], 1) is None  # consecutive positions (a stream continuing): no start


def _supra():
    from msrnn.supra import convert

    return convert(tiny("llama", seed=0))


def _bst():
    from msrnn.bst import BSTConfig, BSTForCausalLM

    torch.manual_seed(0)
    return BSTForCausalLM(BSTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, block_size=8, state_size=4, ssm_layers=[1]))


@pytest.mark.parametrize("make", [lambda: tiny("llama"), lambda: tiny("llama", attn="eager"), _supra],
                         ids=["llama-sdpa", "llama-eager", "supra"])
def test_models_that_reset_at_restarting_positions_pass_the_check(make):
    assert position_reset_failure(make()) is None


def test_models_that_do_not_reset_fail_the_check_with_the_reason():
    from msrnn.rmt import MemoryWrapper

    assert "refuses position ids" in position_reset_failure(_bst())
    rmt = MemoryWrapper.wrap(tiny("llama"), num_memory_tokens=2, segment_length=8)  # LM-trained by compare --build
    assert "refuses position ids" in position_reset_failure(rmt)
    from transformers import LlamaForCausalLM

    class IgnoresPositions(LlamaForCausalLM):  # a decoder whose forward drops position_ids
        def forward(self, input_ids=None, position_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    model = IgnoresPositions(tiny("llama").config)
    assert "changed by" in position_reset_failure(model)


@pytest.mark.parametrize("make,layout", [(lambda: tiny("llama"), "packed"), (_supra, "packed"), (_bst, "rows")],
                         ids=["llama", "supra", "bst"])
def test_packed_and_row_layouts_give_the_same_loss_and_gradients(make, layout):
    """The packed batch (fast) and a row per document (the readable twin) are the same training step."""
    stream = TokenStream(np.random.default_rng(1).integers(1, V - 1, 120).astype(np.uint16),
                         np.array([0, 23, 24, 61, 70, 120]), list("abcde"))
    batches = LMBatches(stream, seq_len=40, batch_size=3, eos_id=V - 1, seed=0)
    model = make().train()
    source = DocumentBatches(batches.batch, pad_id=0)
    assert source.choose(model) == layout
    packed = batches.batch(0)
    assert int((packed["position_ids"][:, 1:] == 0).sum()) >= 2  # the batch does pack documents
    rows = document_rows(packed, pad_id=0)
    assert source(0).keys() == (packed if layout == "packed" else rows).keys()
    if layout == "rows":  # a model that fails the check is never given the packed batch
        assert source(0)["input_ids"].equal(rows["input_ids"])
        return
    loss = ChunkedLMLoss(chunk_tokens=16)
    results = []
    for batch in (packed, rows):
        model.zero_grad()
        value = loss(model, batch)
        value.backward()
        results.append((float(value.detach()), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    assert abs(l1 - l2) < 1e-5 * abs(l1)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_the_layout_must_be_chosen_before_the_first_batch():
    source = DocumentBatches(LMBatches(_stream(), seq_len=6, batch_size=2, eos_id=EOS).batch, pad_id=0)
    with pytest.raises(RuntimeError, match="choose"):
        source(0)
