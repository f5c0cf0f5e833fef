"""The plain HF family's spec (``msrnn.families``): a decoder with its whole KV cache, the unbounded reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from msrnn.families import Cost, FamilySpec, Knobs, NoKnobs


class FullSpec(FamilySpec):
    """Any Hugging Face causal LM with its full KV cache."""

    name = "hf"
    label = "full"
    help = "any Hugging Face causal LM with its full KV cache"
    knobs_type: ClassVar[type[Knobs]] = NoKnobs
    loadable = True
    marker = "*"
    reference = True

    def cost(self, arch: Any, length: int, knobs: Knobs) -> Cost:
        """Softmax attention over the whole KV cache: attention FLOPs grow as L^2, state as L."""
        pairs = length * (length + 1) / 2
        return {"flops": arch.dense_flops_per_token() * length + arch.layers * 4 * arch.heads * arch.head_dim * pairs,
                "state_bytes": arch.kv_bytes_per_slot() * length}

    def make(self, base_model: Any, knobs: Knobs, seed: int = 0) -> Any:
        """The full-cache model's trainable module is the base decoder itself."""
        return base_model.train()

    def load(self, path: str | Path, **options: Any) -> Any:
        from msrnn.models.loading import load_full

        return load_full(path, **options)

    def load_trainable(self, path: Path) -> Any:
        from msrnn.models.loading import load_hf_causal_lm

        return load_hf_causal_lm(path)

    def series(self, entry: dict[str, Any]) -> str | None:
        return None
