"""Recurrent Memory Transformer: the decoder memory wrapper, its encoder classifier twin, and streaming.

Papers: Bulatov et al., "Recurrent Memory Transformer", NeurIPS 2022, https://arxiv.org/abs/2207.06881; "Scaling
Transformer to 1M tokens and beyond with RMT", https://arxiv.org/abs/2304.11062. Official code
https://github.com/booydar/recurrent-memory-transformer. Deviations are stated in ``wrapper`` and ``encoder``.
"""

from msrnn.rmt.config import RMTConfig
from msrnn.rmt.encoder import MemoryEncoderClassifier, RMTEncoderConfig
from msrnn.rmt.lm import RMTLM, RMTState, load_rmt
from msrnn.rmt.wrapper import MemoryWrapper

__all__ = ["RMTLM", "MemoryEncoderClassifier", "MemoryWrapper", "RMTConfig", "RMTEncoderConfig", "RMTState",
           "load_rmt"]
