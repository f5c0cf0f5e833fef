"""State-space and long-convolution layers used by the Block-State Transformer.

S4D: Gu et al., "On the Parameterization and Initialization of Diagonal State Space Models",
https://arxiv.org/abs/2206.11893; official code https://github.com/state-spaces/s4 (``models/s4/s4d.py``). The
unstructured filter follows Hyena (Poli et al., https://arxiv.org/abs/2302.10866). Parameters and FFTs stay fp32.
"""

from msrnn.ssm.conv import causal_fft_conv
from msrnn.ssm.s4d import S4DKernel, fft_conv, fft_conv_ref, recurrent_scan
from msrnn.ssm.unstruct import UnstructFilter, fir_conv

__all__ = ["S4DKernel", "UnstructFilter", "causal_fft_conv", "fft_conv_ref", "fft_conv", "fir_conv",
           "recurrent_scan"]
