"""KV eviction: any HF decoder as a bounded multi-state RNN (Window, Window+i, H2O, TOVA).

Papers: Oren et al., "Transformers are Multi-State RNNs" (TOVA), https://arxiv.org/abs/2401.06104, official code
https://github.com/schwartz-lab-NLP/TOVA; Xiao et al., StreamingLLM (Window+i), https://arxiv.org/abs/2309.17453,
https://github.com/mit-han-lab/streaming-llm; Zhang et al., H2O, https://arxiv.org/abs/2306.14048,
https://github.com/FMInference/H2O. Deviations from each official code are listed in the README's policy table.
Use it through :class:`KVSettings` and :func:`apply_kv`.
"""

from msrnn.kv.cache import KVEvictionCache
from msrnn.kv.lm import KVEvictionLM, check_supported, make_cache, prepare_model
from msrnn.kv.policies import H2O, KV_POLICIES, TOVA, Full, Policy, Sink, Window, make_policy
from msrnn.kv.settings import KVSettings, apply_kv, parse_policy_spec, settings_or_none

__all__ = [
    "H2O",
    "KV_POLICIES",
    "TOVA",
    "Full",
    "KVEvictionCache",
    "KVEvictionLM",
    "KVSettings",
    "Policy",
    "Sink",
    "Window",
    "apply_kv",
    "check_supported",
    "make_cache",
    "make_policy",
    "parse_policy_spec",
    "prepare_model",
    "settings_or_none",
]
