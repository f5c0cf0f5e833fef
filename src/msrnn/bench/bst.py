"""BST benchmarks, ratios measured side by side in one run.

* ssm: the S4D layer as an FFT convolution versus the sequential recurrent scan (the same function, tested
  equal), at L = 4k, 16k, 64k;
* layer: one BST:SH layer (all blocks in parallel, SSM by FFT) versus one full causal attention layer of the same
  width, and versus the same BST layer run block by block (the sequential block-recurrent schedule that BRECT
  needs and BST removes), at L = 1k..16k;
* memory: peak RSS of one forward of each layer versus L, each in a fresh process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from msrnn.bench.rows import Row
from msrnn.bench.timing import median_time, peak_rss_mib
from msrnn.bst.config import BSTConfig
from msrnn.bst.layers import BSTLayer
from msrnn.ssm.s4d import S4DKernel, fft_conv, recurrent_scan


@dataclass
class SSMRow(Row):
    """One length of the S4D layer: FFT convolution and (up to ``scan_max``) the recurrent scan, ms."""

    L: int
    fft_ms: float
    scan_ms: float | None = None

    @property
    def scan_over_fft(self) -> float | None:
        return None if self.scan_ms is None else self.scan_ms / self.fft_ms

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"L": self.L, "fft ms": self.fft_ms}
        if self.scan_ms is not None:
            out.update({"scan ms": self.scan_ms, "scan / fft": self.scan_over_fft})
        return out


@dataclass
class LayerRow(Row):
    """One length of one layer: BST:SH, full causal attention and (up to ``sequential_max``) the same BST layer
    run block by block, ms."""

    L: int
    bst_ms: float
    full_ms: float
    sequential_ms: float | None = None

    @property
    def sequential_over_bst(self) -> float | None:
        return None if self.sequential_ms is None else self.sequential_ms / self.bst_ms

    @property
    def full_over_bst(self) -> float:
        return self.full_ms / self.bst_ms

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"L": self.L, "bst ms": self.bst_ms, "full attn ms": self.full_ms}
        if self.sequential_ms is not None:
            out.update({"block-sequential ms": self.sequential_ms, "sequential / bst": self.sequential_over_bst})
        return {**out, "full / bst": self.full_over_bst}


@dataclass
class MemoryRow(Row):
    """Peak RSS growth of one forward at length L, MiB."""

    L: int
    bst_mib: float
    full_mib: float

    def to_json(self) -> dict[str, Any]:
        return {"L": self.L, "bst MiB": self.bst_mib, "full attn MiB": self.full_mib}


@torch.inference_mode()
def bench_ssm(lengths: list[int], channels: int = 256, state_size: int = 16, rounds: int = 3,
              scan_max: int = 65536) -> list[SSMRow]:
    """S4D by FFT versus the recurrent scan at each length."""
    torch.manual_seed(0)
    ssm = S4DKernel(channels, state_size)
    rows = []
    for L in lengths:
        u = torch.randn(1, channels, L)
        row = SSMRow(L, 1e3 * median_time(lambda u=u: fft_conv(u, ssm), rounds))
        if L <= scan_max:
            row.scan_ms = 1e3 * median_time(lambda u=u: recurrent_scan(u, ssm), 1)
        rows.append(row)
    return rows


def layer_config(variant: str, d: int, heads: int, W: int) -> BSTConfig:
    """The BST config of one benchmarked layer."""
    return BSTConfig(hidden_size=d, num_attention_heads=heads, num_hidden_layers=1, intermediate_size=4 * d,
                     block_size=W, variant=variant, ssm_layers=[0])


@torch.inference_mode()
def bench_layers(lengths: list[int], d: int = 256, heads: int = 4, W: int = 128, rounds: int = 3,
                 sequential_max: int = 16384) -> list[LayerRow]:
    """A BST layer versus full attention versus the same layer block by block."""
    torch.manual_seed(0)
    bst = BSTLayer(layer_config("sh", d, heads, W), has_ssm=True).eval()
    full = BSTLayer(layer_config("full", d, heads, W), has_ssm=False).eval()
    rows = []
    for L in lengths:
        x = torch.randn(1, L, d)
        row = LayerRow(L, 1e3 * median_time(lambda x=x: bst(x, W), rounds),
                       1e3 * median_time(lambda x=x, L=L: full(x, L), rounds))

        def sequential(x: torch.Tensor = x, L: int = L) -> None:
            state = bst.init_state(1, x.device)
            for s in range(0, L, W):
                bst.step(x[:, s : s + W], state, s, 0, W)

        if L <= sequential_max:
            row.sequential_ms = 1e3 * median_time(sequential, 1)
        rows.append(row)
    return rows


def bench_memory(lengths: list[int], d: int = 256, heads: int = 4, W: int = 128) -> list[MemoryRow]:
    """Peak RSS of a BST layer and of full attention versus length (subprocesses)."""
    rows = []
    for L in lengths:
        mib = []
        for variant, block in (("sh", W), ("full", L)):
            code = (
                "from msrnn.bench.bst import layer_config\nfrom msrnn.bst.layers import BSTLayer\n"
                f"layer = BSTLayer(layer_config({variant!r}, {d}, {heads}, {W}), has_ssm={variant == 'sh'}).eval()\n"
                "with torch.inference_mode():\n"
                f"    layer(torch.randn(1, {L}, {d}), {block})\n"
            )
            mib.append(round(peak_rss_mib(code), 1))
        rows.append(MemoryRow(L, *mib))
    return rows
