"""SUPRA linearisation (in progress): the decayed linear-attention ops are here; the layer, conversion and
uptraining are tracked in the SUPRA issue."""

from msrnn.supra.ops import DECAYS, chunked, log_decay, naive_recurrent, recurrent_step

__all__ = ["DECAYS", "chunked", "log_decay", "naive_recurrent", "recurrent_step"]
