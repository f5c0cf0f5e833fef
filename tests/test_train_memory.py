"""The training-memory benchmark: its byte counter agrees with PyTorch's MemTracker on real tensors, and at a small
shape the chunked loss and activation checkpointing keep less for the backward, per token too."""

import json

import torch
from helpers import tiny

from msrnn.bench.train_memory import LiveTensorBytes, run


def _step(model, opt, x):
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_live_tensor_bytes_agrees_with_torchs_mem_tracker_on_a_real_step():
    from torch.distributed._tools.mem_tracker import MemTracker

    peaks = []
    for counter in ("mem_tracker", "live"):
        torch.manual_seed(0)
        model = tiny("llama").train()
        opt = torch.optim.AdamW(model.parameters())
        x = torch.randint(0, 384, (2, 96))
        _step(model, opt, x)  # AdamW's states exist, as in the benchmark's measured step
        if counter == "mem_tracker":
            mt = MemTracker()
            mt.track_external(model, opt, x)
            with mt:
                _step(model, opt, x)
            snap = mt.get_tracker_snapshot("peak")
            peaks.append(snap[next(iter(snap))]["Total"])
        else:
            live = LiveTensorBytes()
            live.track([*model.parameters(), *[s for st in opt.state.values() for s in st.values()], x])
            live.reset_peak()
            with live:
                _step(model, opt, x)
            peaks.append(live.peak)
    assert abs(peaks[0] - peaks[1]) <= 1024, peaks


def test_the_chunked_loss_and_checkpointing_keep_less_per_token(tmp_path):
    result = run(["hf", "supra"], "small", 4096, [256, 768])
    json.dumps(result)  # what --json prints
    rows = {(r["family"], r["tokens"], r["loss"], r["activation_checkpointing"]): r for r in result["rows"]}
    assert len(rows) == 12
    for family in ("hf", "supra"):
        for tokens in (256, 768):
            full = rows[family, tokens, "full", False]["saved_mib"]
            chunked = rows[family, tokens, "chunked", False]["saved_mib"]
            ckpt = rows[family, tokens, "chunked", True]["saved_mib"]
            assert full > chunked > ckpt > 0
        slope = {(p["loss"], p["activation_checkpointing"]): p["kib_per_token"] for p in result["per_token"]
                 if p["family"] == family}
        # The full loss keeps fp32 log-probabilities, 4 bytes x 4,096 = 16 KiB per token, that the chunked one drops.
        assert slope["full", False] - slope["chunked", False] >= 14
        assert slope["chunked", True] < slope["chunked", False] / 3
