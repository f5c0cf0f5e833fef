"""One assert_close for the whole suite: reports max-abs and relative-RMS error, fails on NaN."""

from __future__ import annotations

import torch


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, atol: float = 1e-5, rtol: float = 0.0) -> None:
    ref, out = ref.detach().double(), out.detach().double()
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: output has NaN"
    err = (ref - out).abs()
    rel_rms = (err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    bound = atol + rtol * ref.abs()
    assert bool((err <= bound).all()), (
        f"{name}: max abs err {err.max().item():.3e} (rel rms {rel_rms:.3e}) > atol {atol}"
    )
