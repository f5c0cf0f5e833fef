"""Recurrent Memory Transformer (in progress): the memory wrapper and its streaming adapter."""

from msrnn.rmt.lm import RMTLM, RMTState
from msrnn.rmt.wrapper import MemoryWrapper, RMTConfig

__all__ = ["RMTLM", "MemoryWrapper", "RMTConfig", "RMTState"]
