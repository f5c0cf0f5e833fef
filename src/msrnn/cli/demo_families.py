"""``msrnn demo --families``: the same base model bounded four ways at one state budget, compared.

SUPRA, BST:SH and an RMT are built from the demo's base model by ``msrnn.build`` (each sized so its measured
state fits the budget, each trained on the same few tokens) and cached, so a second run only evaluates. The
token budget is small on purpose: this shows the pipeline and the state sizes on a fresh machine in minutes;
the README's tables come from longer runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def families_section(base: Path, tokens: int, out: Path, progress: bool, budget: int = 262_144,
                     max_tokens: int = 1024, data: str = "stdlib", seq_len: int = 512) -> dict[str, Any]:
    """Build (or reuse) SUPRA, BST and RMT at ``budget`` bytes from ``base``; ``msrnn compare`` them with KV
    eviction at the same bytes."""
    from msrnn.compare import CompareConfig, compare

    cfg = CompareConfig(base=str(base), state_bytes=[budget], build=["supra", "bst", "rmt"], build_tokens=tokens,
                        build_data=data, build_seq_len=seq_len, policies=["window", "tova"], max_tokens=max_tokens,
                        max_docs=4, task="memorize", task_segments=[1, 4], task_samples=16, profile_tokens=1024,
                        probe_tokens=512)
    return compare(cfg, out / "compare", progress=progress)
