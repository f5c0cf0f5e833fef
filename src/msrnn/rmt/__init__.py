"""Recurrent Memory Transformer: the decoder memory wrapper, its encoder classifier twin, and streaming."""

from msrnn.rmt.config import RMTConfig
from msrnn.rmt.encoder import MemoryEncoderClassifier, RMTEncoderConfig
from msrnn.rmt.lm import RMTLM, RMTState, load_rmt
from msrnn.rmt.wrapper import MemoryWrapper

__all__ = ["RMTLM", "MemoryEncoderClassifier", "MemoryWrapper", "RMTConfig", "RMTEncoderConfig", "RMTState",
           "load_rmt"]
