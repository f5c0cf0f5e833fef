"""Every msrnn model directory loads through transformers' Auto classes after a plain ``import msrnn``, in a fresh
process (registration must not depend on having imported a family module first)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import V, tiny

LOAD = """
import json, sys, torch
import msrnn  # nothing else from msrnn: the Auto classes must know every model type now
from transformers import AutoModel, AutoModelForCausalLM
d, auto = sys.argv[1], sys.argv[2]
m = (AutoModelForCausalLM if auto == "causal" else AutoModel).from_pretrained(d).eval()
x = torch.arange(1, 25).remainder(60)[None]
with torch.no_grad():
    out = m(input_ids=x)
logits = out["logits"]
print(json.dumps({"cls": type(m).__name__, "sum": float(logits.double().sum()), "shape": list(logits.shape)}))
"""


def _models():
    from transformers import BertConfig, BertModel

    from msrnn.bst import BSTConfig, BSTForCausalLM
    from msrnn.rmt import MemoryWrapper
    from msrnn.rmt.encoder import MemoryEncoderClassifier
    from msrnn.supra import convert

    bst = BSTForCausalLM(BSTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, block_size=8, state_size=4, ssm_layers=[1]))
    bert = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)
    enc = MemoryEncoderClassifier.wrap(bert, SimpleNamespace(cls_token_id=1, sep_token_id=2, pad_token_id=0),
                                       ["a", "b"], num_memory_tokens=2, segment_length=16)
    return {
        "supra": (convert(tiny("llama")), "causal", "SupraForCausalLM"),
        "bst": (bst, "causal", "BSTForCausalLM"),
        "rmt": (MemoryWrapper.wrap(tiny("llama"), num_memory_tokens=2, segment_length=8), "causal", "MemoryWrapper"),
        "rmt-encoder": (enc, "model", "MemoryEncoderClassifier"),
    }


@pytest.mark.parametrize("family", ["supra", "bst", "rmt", "rmt-encoder"])
def test_auto_from_pretrained_after_a_plain_import(family, tmp_path):
    model, auto, cls = _models()[family]
    model.eval().save_pretrained(tmp_path / family)
    x = torch.arange(1, 25).remainder(60)[None]
    with torch.no_grad():
        want = float(model(input_ids=x)["logits"].double().sum())
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / family), auto], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"] == cls
    assert abs(got["sum"] - want) <= 1e-4 * max(1.0, abs(want))
