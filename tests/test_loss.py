"""The chunked causal LM loss equals the model's own loss on full logits (value and every gradient), and falls back
to the model's own loss, saying why, where its check fails."""

import logging

import pytest
import torch
from helpers import tiny

from msrnn.train.loss import ChunkedLMLoss, chunked_cross_entropy, full_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_cross_entropy_equals_the_full_twin_with_gradients(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 37, bias=True)
    hidden = torch.randn(3, 11, 12, requires_grad=True)
    labels = torch.randint(0, 37, (3, 11))
    labels[0, :4] = -100  # ignored positions
    ref = full_cross_entropy(hidden, labels, head)
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight, head.bias])
    out = chunked_cross_entropy(hidden, labels, head, chunk_tokens=chunk)
    grads = torch.autograd.grad(out, [hidden, head.weight, head.bias])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def _bst():
    from msrnn.bst import BSTConfig, BSTForCausalLM

    torch.manual_seed(0)
    return BSTForCausalLM(BSTConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, block_size=8, state_size=4, ssm_layers=[1]))


def _supra():
    from msrnn.supra import convert

    return convert(tiny("llama", seed=0))


@pytest.mark.parametrize("make", [lambda: tiny("llama"), lambda: tiny("gpt2"), _supra, _bst],
                         ids=["llama", "gpt2", "supra", "bst"])
def test_the_trainers_loss_equals_the_models_own_loss_and_gradients(make, caplog):
    model = make().eval()  # no dropout (GPT-2 has some): the two losses see the same network
    x = torch.randint(0, 384, (2, 21), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "labels": x}
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    loss_fn = ChunkedLMLoss(chunk_tokens=8)
    with caplog.at_level(logging.WARNING, logger="msrnn.train.loss"):
        out = loss_fn(model, batch)
    assert loss_fn.fallback is None and not [r for r in caplog.records if r.name == "msrnn.train.loss"]
    grads = torch.autograd.grad(out, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7, msg=name)


def test_a_model_that_transforms_its_logits_fails_the_check_and_trains_on_its_own_loss(caplog):
    """Gemma-2-style soft-capping: head(last hidden state) is not the model's logits, so the chunked loss would be
    another loss. The check names itself and the model's own loss is used."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).train()
    x = torch.randint(0, 384, (1, 9))
    loss_fn = ChunkedLMLoss()
    with caplog.at_level(logging.WARNING, logger="msrnn.train.loss"):
        out = loss_fn(model, {"input_ids": x, "labels": x})
    assert "head_of_last_hidden_state_equals_logits" in loss_fn.fallback
    assert "head_of_last_hidden_state_equals_logits" in caplog.text
    torch.testing.assert_close(out, model(input_ids=x, labels=x).loss)


def test_a_model_without_logits_to_keep_trains_on_its_own_loss(caplog):
    from msrnn.rmt import MemoryWrapper

    model = MemoryWrapper.wrap(tiny("llama", seed=0), num_memory_tokens=2, segment_length=8).train()
    x = torch.randint(0, 384, (1, 20))
    loss_fn = ChunkedLMLoss()
    with caplog.at_level(logging.INFO, logger="msrnn.train.loss"):
        out = loss_fn(model, {"input_ids": x, "labels": x})
    assert "takes no logits_to_keep" in loss_fn.fallback
    # Not a failed check: a line in the log, not a warning (the demo trains an RMT and would show it).
    assert [r.levelno for r in caplog.records if r.name == "msrnn.train.loss"] == [logging.INFO]
    torch.testing.assert_close(out, model(input_ids=x, labels=x)["loss"])
