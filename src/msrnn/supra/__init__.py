"""SUPRA linearisation (Mercat et al., 2024): a pretrained softmax transformer as a linear-attention RNN."""

from msrnn.supra.convert import convert
from msrnn.supra.lm import SupraLM, load_supra
from msrnn.supra.modeling import SupraCache, SupraConfig, SupraForCausalLM
from msrnn.supra.ops import (
    BACKENDS,
    DECAYS,
    chunked,
    fla_chunked,
    log_decay,
    naive_recurrent,
    recurrent_step,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "DECAYS",
    "SupraCache",
    "SupraConfig",
    "SupraForCausalLM",
    "SupraLM",
    "chunked",
    "convert",
    "fla_chunked",
    "load_supra",
    "log_decay",
    "naive_recurrent",
    "recurrent_step",
    "resolve_backend",
]
