"""BST benchmarks, ratios measured side by side in one run.

* ssm: the S4D layer as an FFT convolution versus the sequential recurrent scan (the same function, tested
  equal), at L = 4k, 16k, 64k;
* layer: one BST:SH layer (all blocks in parallel, SSM by FFT) versus one full causal attention layer of the same
  width, and versus the same BST layer run block by block (the sequential block-recurrent schedule that BRECT
  needs and BST removes), at L = 1k..16k;
* memory: peak RSS of one forward of each layer versus L, each in a fresh process.
"""

from __future__ import annotations

from typing import Any

import torch

from msrnn.bench.timing import median_time, peak_rss_mib
from msrnn.bst.config import BSTConfig
from msrnn.bst.layers import BSTLayer
from msrnn.ssm.s4d import S4DKernel, fft_conv, recurrent_scan


@torch.inference_mode()
def bench_ssm(lengths: list[int], channels: int = 256, state_size: int = 16, rounds: int = 3,
              scan_max: int = 65536) -> list[dict[str, Any]]:
    """S4D by FFT versus the recurrent scan at each length."""
    torch.manual_seed(0)
    ssm = S4DKernel(channels, state_size)
    rows = []
    for L in lengths:
        u = torch.randn(1, channels, L)
        row: dict[str, Any] = {"L": L, "fft ms": 1e3 * median_time(lambda u=u: fft_conv(u, ssm), rounds)}
        if L <= scan_max:
            row["scan ms"] = 1e3 * median_time(lambda u=u: recurrent_scan(u, ssm), 1)
            row["scan / fft"] = row["scan ms"] / row["fft ms"]
        rows.append(row)
    return rows


def layer_config(variant: str, d: int, heads: int, W: int) -> BSTConfig:
    """The BST config of one benchmarked layer."""
    return BSTConfig(hidden_size=d, num_attention_heads=heads, num_hidden_layers=1, intermediate_size=4 * d,
                     block_size=W, variant=variant, ssm_layers=[0])


@torch.inference_mode()
def bench_layers(lengths: list[int], d: int = 256, heads: int = 4, W: int = 128, rounds: int = 3,
                 sequential_max: int = 16384) -> list[dict[str, Any]]:
    """A BST layer versus full attention versus the same layer block by block."""
    torch.manual_seed(0)
    bst = BSTLayer(layer_config("sh", d, heads, W), has_ssm=True).eval()
    full = BSTLayer(layer_config("full", d, heads, W), has_ssm=False).eval()
    rows = []
    for L in lengths:
        x = torch.randn(1, L, d)
        row: dict[str, Any] = {"L": L}
        row["bst ms"] = 1e3 * median_time(lambda x=x: bst(x, W), rounds)
        row["full attn ms"] = 1e3 * median_time(lambda x=x, L=L: full(x, L), rounds)

        def sequential(x: torch.Tensor = x, L: int = L) -> None:
            state = bst.init_state(1, x.device)
            for s in range(0, L, W):
                bst.step(x[:, s : s + W], state, s, 0, W)

        if L <= sequential_max:
            row["block-sequential ms"] = 1e3 * median_time(sequential, 1)
            row["sequential / bst"] = row["block-sequential ms"] / row["bst ms"]
        row["full / bst"] = row["full attn ms"] / row["bst ms"]
        rows.append(row)
    return rows


def bench_memory(lengths: list[int], d: int = 256, heads: int = 4, W: int = 128) -> list[dict[str, Any]]:
    """Peak RSS of a BST layer and of full attention versus length (subprocesses)."""
    rows = []
    for L in lengths:
        row: dict[str, Any] = {"L": L}
        for name, variant, block in (("bst MiB", "sh", W), ("full attn MiB", "full", L)):
            code = (
                "from msrnn.bench.bst import layer_config\nfrom msrnn.bst.layers import BSTLayer\n"
                f"layer = BSTLayer(layer_config({variant!r}, {d}, {heads}, {W}), has_ssm={variant == 'sh'}).eval()\n"
                "with torch.inference_mode():\n"
                f"    layer(torch.randn(1, {L}, {d}), {block})\n"
            )
            row[name] = round(peak_rss_mib(code), 1)
        rows.append(row)
    return rows
