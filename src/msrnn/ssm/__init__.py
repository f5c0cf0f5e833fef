"""State-space layers (S4D) used by the Block-State Transformer."""

from msrnn.ssm.s4d import S4DKernel, direct_conv, fft_conv, recurrent_scan

__all__ = ["S4DKernel", "direct_conv", "fft_conv", "recurrent_scan"]
