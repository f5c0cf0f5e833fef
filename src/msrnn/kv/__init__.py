"""KV eviction: any HF decoder as a bounded multi-state RNN (Window, Window+i, H2O, TOVA)."""

from msrnn.kv.cache import KVEvictionCache
from msrnn.kv.lm import KVEvictionLM, check_supported, make_cache, prepare_model, wrap
from msrnn.kv.policies import H2O, KV_POLICIES, TOVA, Full, Policy, Sink, Window, make_policy

__all__ = [
    "H2O",
    "KV_POLICIES",
    "TOVA",
    "Full",
    "KVEvictionCache",
    "KVEvictionLM",
    "Policy",
    "Sink",
    "Window",
    "check_supported",
    "make_cache",
    "make_policy",
    "prepare_model",
    "wrap",
]
