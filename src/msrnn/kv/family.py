"""KV eviction's spec (``msrnn.families``): a plain HF decoder bounded by a policy (``msrnn.kv.apply_kv``).

Its knobs are :class:`~msrnn.kv.KVSettings` (policy, ``budget`` in slots per layer, prefill, storage...): a
KV-bounded model is not saved as a family of its own, it is a plain model with settings applied, so ``load`` refuses
and ``apply``/``open`` bind a loaded base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from msrnn.families import Cost, FamilySpec, Knobs
from msrnn.kv.settings import KVSettings, apply_kv

# The fewest slots per layer a byte budget may leave: fewer is not a meaningful cache.
MIN_SLOTS = 8


class KVSpec(FamilySpec):
    """KV eviction (Window, Window+i, H2O, TOVA) applied to a plain decoder."""

    name = "kv"
    help = "KV eviction on an HF model (Window, Window+i, H2O, TOVA)"
    applies = True
    knobs_type: ClassVar[type[Knobs]] = KVSettings
    tuned_family = "hf"  # task fine-tuning trains the plain base model the policy is applied to
    shrink_step = ("budget", 1, MIN_SLOTS)
    defaults: ClassVar[dict[str, Any]] = {"policy": "tova", "budget": 512}

    def knobs(self, **values: Any) -> Knobs:
        return super().knobs(**{**self.defaults, **values})

    def cost(self, arch: Any, length: int, knobs: Knobs) -> Cost:
        """``budget`` slots per layer; a policy that scores slots from attention (TOVA, H2O) adds one probability
        row per token."""
        L, k = length, knobs.budget
        attn_unit = 4 * arch.heads * arch.head_dim
        # Token t attends to min(t - 1, k) kept slots plus itself.
        pairs = sum(min(t - 1, k) + 1 for t in range(1, min(L, k + 1) + 1)) + max(0, L - k - 1) * (k + 1)
        scored = knobs.make_policy().needs != "none"
        extra = arch.layers * 2 * arch.heads * arch.head_dim * (k + 1) * max(0, L - k) if scored else 0
        return {"flops": arch.dense_flops_per_token() * L + arch.layers * attn_unit * pairs + extra,
                "state_bytes": arch.kv_bytes_per_slot() * min(L, k)}

    def size_for_state_bytes(self, arch: Any, state_bytes: int, knobs: Knobs) -> Knobs | None:
        """As many slots as the keys and values of every layer fit in ``state_bytes`` (the measured fit then takes
        off the policy's bookkeeping)."""
        slots = state_bytes // arch.kv_bytes_per_slot()
        return knobs.replace(budget=int(slots)) if slots >= MIN_SLOTS else None

    def probe(self, knobs: Knobs) -> tuple[int, int]:
        # Past the budget several times, in 7-token chunks: the state at each chunk's end and inside it.
        return 4 * knobs.budget + 64, 7

    def untrained_lm(self, base_model: Any, knobs: Knobs, seed: int = 0) -> Any:
        from msrnn.models.hf import HFCausalLM

        return apply_kv(HFCausalLM(base_model), knobs)

    def apply(self, lm: Any, knobs: Knobs) -> Any:
        return apply_kv(lm, knobs)

    def load_trainable(self, path: Path) -> Any:
        """The plain base model a policy is applied to (task fine-tuning tunes it)."""
        from msrnn.models.loading import load_hf_causal_lm

        return load_hf_causal_lm(path)

    def chunk_invariant(self, lm: Any) -> bool:
        """Exact prefill is the token-by-token result for any chunking; oneshot and chunked:C evict per chunk."""
        return lm.prefill == "exact"

    def retention(self, lm: Any, state: Any, positions: list[int]) -> list[float] | None:
        """Per layer, the share of ``positions`` among the kept slots (per-head policies: averaged over KV heads)."""
        import torch

        want = torch.tensor(positions)
        out = []
        for i in range(len(state.cache.layers)):
            kept = state.cache.kept_positions(i)[0]  # [G, S] the first sequence's slots, per selection group
            out.append(float(torch.isin(want, kept).float().mean()) if kept.shape[0] == 1 else
                       float(torch.stack([torch.isin(want, g).float().mean() for g in kept]).mean()))
        return out

    def series(self, entry: dict[str, Any]) -> str | None:
        return f"kv {entry['policy']}"

    def shown(self, entry: dict[str, Any]) -> bool:
        return entry.get("policy") == "tova"  # TOVA stands in for the policies
