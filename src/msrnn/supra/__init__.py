"""SUPRA linearisation (Mercat et al., 2024): a pretrained softmax transformer as a linear-attention RNN.

Paper: "Linearizing Large Language Models", https://arxiv.org/abs/2405.06640; official code
https://github.com/TRI-ML/linear_open_lm. :func:`convert` copies a Llama/Mistral/Qwen2 model's weights into a
:class:`SupraForCausalLM`; :class:`SupraLM` streams it with a constant [layers, heads, F, d] fp32 state.
"""

from msrnn.supra.convert import convert
from msrnn.supra.lm import SupraLM, load_supra
from msrnn.supra.modeling import SupraCache, SupraConfig, SupraForCausalLM
from msrnn.supra.ops import (
    BACKENDS,
    DECAYS,
    chunked,
    chunked_ref,
    fla_chunked,
    log_decay,
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
    "chunked_ref",
    "recurrent_step",
    "resolve_backend",
]
