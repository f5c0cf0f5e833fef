"""SUPRA's spec (``msrnn.families``): its cost model and how a build sizes, makes and loads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from msrnn.families import Cost, FamilySpec, Knobs


@dataclass(frozen=True)
class SupraKnobs(Knobs):
    """SUPRA's size: phi's output width per head (None: the head width, as the paper's SUPRA does)."""

    feature_dim: int | None = None

    SIZE_FIELDS = ("feature_dim",)

    def __post_init__(self) -> None:
        self.require_ints("SUPRA", ("feature_dim",))


class SupraSpec(FamilySpec):
    """SUPRA: a softmax decoder uptrained into a linear-attention RNN with a constant state."""

    name = "supra"
    help = "SUPRA linear-attention RNN (constant state)"
    knobs_type: ClassVar[type[Knobs]] = SupraKnobs
    loadable = True
    trainable = True
    shrink_step = ("feature_dim", 2, 2)
    self_check = {"feature_dim": 8}  # an 8-wide feature map around msrnn.models.selfcheck's tiny Llama
    marker = "s"

    def cost(self, arch: Any, length: int, knobs: Knobs) -> Cost:
        """Linear attention: phi maps plus a [H, F, d] fp32 state per layer (constant; F = feature_dim, default d)."""
        phi = 2 * (arch.heads * arch.head_dim) ** 2 + 2 * (arch.kv_heads * arch.head_dim) ** 2
        rec = 4 * arch.heads * arch.head_dim * arch.head_dim  # state update k^T v and readout q S
        return {"flops": arch.dense_flops_per_token() * length + arch.layers * (phi + rec) * length,
                "state_bytes": arch.layers * arch.heads * (knobs.feature_dim or arch.head_dim) * arch.head_dim * 4}

    def size_for_state_bytes(self, arch: Any, state_bytes: int, knobs: Knobs) -> Knobs | None:
        """The largest even feature width F whose state fits ``state_bytes``."""
        F = (state_bytes // (arch.layers * arch.heads * arch.head_dim * 4)) // 2 * 2
        return knobs.replace(feature_dim=int(F)) if F >= 2 else None

    def make(self, base_model: Any, knobs: Knobs, seed: int = 0) -> Any:
        """The untrained SUPRA conversion of the base decoder at ``knobs``."""
        from msrnn.supra.convert import convert

        return convert(base_model, feature_dim=knobs.feature_dim, seed=seed).train()

    def as_lm(self, model: Any) -> Any:
        from msrnn.supra.lm import SupraLM

        return SupraLM(model)

    def load(self, path: str | Path, **options: Any) -> Any:
        from msrnn.supra.lm import load_supra

        return load_supra(path, **options)

    def load_trainable(self, path: Path) -> Any:
        """A saved SUPRA model as a trainable causal LM."""
        from msrnn.models.loading import load_hf_causal_lm

        return load_hf_causal_lm(path)
