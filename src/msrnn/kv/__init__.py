"""KV eviction: any HF decoder as a bounded multi-state RNN (Window, Window+i, H2O, TOVA)."""

from msrnn.kv.cache import KVEvictionCache
from msrnn.kv.lm import KVEvictionLM, check_supported, make_cache, prepare_model
from msrnn.kv.policies import H2O, KV_POLICIES, TOVA, Full, Policy, Sink, Window, make_policy
from msrnn.kv.settings import KVSettings, apply_kv, parse_policy_spec

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
]
