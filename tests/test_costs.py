"""The analytic cost model: scaling laws, and state bytes equal to what the implementations hold."""

import pytest
import torch
from helpers import V, tiny

from msrnn.bench.costs import Arch, cost_table, costs
from msrnn.errors import ConfigError


def test_scaling_shapes():
    a = Arch(layers=4, d=256, heads=4, kv_heads=2, head_dim=64, ffn=688, vocab=4096)
    full = [costs(a, "full", L) for L in (1024, 2048, 4096)]
    kv = [costs(a, "kv", L, budget=256) for L in (1024, 2048, 4096)]
    # Full attention's extra cost over the dense part grows ~4x per doubling; KV eviction's ~2x.
    dense = [a.dense_flops_per_token() * L for L in (1024, 2048, 4096)]
    assert 3.8 < (full[2]["flops"] - dense[2]) / (full[1]["flops"] - dense[1]) < 4.2
    assert 1.9 < (kv[2]["flops"] - dense[2]) / (kv[1]["flops"] - dense[1]) < 2.1
    assert full[2]["state_bytes"] == 2 * full[1]["state_bytes"]
    for fam in ("kv", "supra", "bst", "rmt"):
        assert costs(a, fam, 1024)["state_bytes"] == costs(a, fam, 65536)["state_bytes"]
    assert {r["family"] for r in cost_table(a, [64])} == {"full", "kv", "supra", "bst", "rmt"}
    with pytest.raises(ConfigError):
        costs(a, "lstm", 10)


def test_state_bytes_match_the_implementations():
    from msrnn.kv import KVEvictionLM, make_policy
    from msrnn.models import HFCausalLM
    from msrnn.models.hf import cache_kv_nbytes
    from msrnn.supra import SupraLM, convert

    model = tiny("llama")
    arch = Arch.from_config(model.config)
    x = torch.randint(0, V, (1, 50))
    with torch.no_grad():
        full = HFCausalLM(model)
        _, st = full.forward_chunk(x, full.init_state(1))
        assert full.state_nbytes(st) == costs(arch, "full", 50)["state_bytes"]
        kv = KVEvictionLM(model, make_policy("tova", 16))
        _, st = kv.forward_chunk(x, kv.init_state(1))
        kv_only = cache_kv_nbytes(st.cache)
        assert kv_only == costs(arch, "kv", 50, budget=16)["state_bytes"]
        sup = SupraLM(convert(model))
        _, st = sup.forward_chunk(x, sup.init_state(1))
        assert sup.state_nbytes(st) == costs(arch, "supra", 50)["state_bytes"]
        sup = SupraLM(convert(model, feature_dim=6))
        _, st = sup.forward_chunk(x, sup.init_state(1))
        assert sup.state_nbytes(st) == costs(arch, "supra", 50, feature_dim=6)["state_bytes"]
        from msrnn.bst import BSTLM, BSTConfig, BSTForCausalLM

        cfg = BSTConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, block_size=16, state_size=8, ssm_layers=[1])
        bst = BSTLM(BSTForCausalLM(cfg).eval())
        _, st = bst.forward_chunk(x[:, :47], bst.init_state(1))  # 2 blocks + 15 tokens: the peak
        bst_cost = costs(Arch.from_config(cfg), "bst", 47, block_size=16, state_size=8)
        assert bst.state_nbytes(st) == bst_cost["state_bytes"]


def test_cli_costs(tmp_path, capsys):
    import json

    from msrnn.cli.main import main

    assert main(["bench", "costs", "--preset", "tiny", "--lengths", "64,128", "--plot", str(tmp_path / "c.png"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 10 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
