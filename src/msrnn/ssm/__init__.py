"""State-space and long-convolution layers used by the Block-State Transformer."""

from msrnn.ssm.conv import causal_fft_conv
from msrnn.ssm.s4d import S4DKernel, direct_conv, fft_conv, recurrent_scan
from msrnn.ssm.unstruct import UnstructFilter, fir_conv

__all__ = ["S4DKernel", "UnstructFilter", "causal_fft_conv", "direct_conv", "fft_conv", "fir_conv",
           "recurrent_scan"]
