"""RMT's spec (``msrnn.families``): its cost model, how a build sizes, makes and loads it, and how an RMT answers
and records a task."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from msrnn.errors import ConfigError
from msrnn.families import Cost, FamilySpec, Knobs


@dataclass(frozen=True)
class RMTKnobs(Knobs):
    """RMT's size: tokens per segment and memory tokens."""

    segment_length: int = 512
    num_memory_tokens: int = 16

    SIZE_FIELDS = ("segment_length", "num_memory_tokens")

    def __post_init__(self) -> None:
        self.require_ints("RMT", self.SIZE_FIELDS)


class RMTSpec(FamilySpec):
    """The Recurrent Memory Transformer: memory tokens carried across segments."""

    name = "rmt"
    help = "Recurrent Memory Transformer (memory tokens)"
    applies = True
    knobs_type: ClassVar[type[Knobs]] = RMTKnobs
    loadable = True
    trainable = True
    shrink_step = ("segment_length", 1, 8)
    # 8-token segments around msrnn.models.selfcheck's tiny Llama (a 24-token check crosses two).
    self_check = {"segment_length": 8, "num_memory_tokens": 2}
    marker = "^"

    def cost(self, arch: Any, length: int, knobs: Knobs) -> Cost:
        """Full attention inside segments of ``segment_length`` tokens plus 2 * ``num_memory_tokens`` memory
        slots; the state between segments is the memory vectors."""
        segment, memory = knobs.segment_length, knobs.num_memory_tokens
        seg = segment + 2 * memory
        attn_unit = 4 * arch.heads * arch.head_dim
        per_seg = arch.dense_flops_per_token() * seg + arch.layers * attn_unit * seg * (seg + 1) / 2
        return {"flops": math.ceil(length / segment) * per_seg, "state_bytes": memory * arch.d * arch.bytes_per_value}

    def size_for_state_bytes(self, arch: Any, state_bytes: int, knobs: Knobs) -> Knobs | None:
        """The state is the memory plus the current segment's keys and values (m read slots + up to S - 1 tokens),
        so S takes what m leaves; m is the largest of 16/8/4/2 that leaves a segment of at least 4m tokens."""
        for m in (16, 8, 4, 2):
            S = (state_bytes - m * arch.d * arch.bytes_per_value) // arch.kv_bytes_per_slot() - m + 1
            if S >= 4 * m:
                return knobs.replace(segment_length=int(min(S, 1024)), num_memory_tokens=m)
        return None

    def probe(self, knobs: Knobs) -> tuple[int, int]:
        return 2 * knobs.segment_length + 16, 1  # two segments, one token at a time: every in-segment offset

    def train_seq_len(self, seq_len: int, knobs: Knobs) -> int:
        """Whole segments per training sequence, so every sequence ends on a segment boundary."""
        return max(1, seq_len // knobs.segment_length) * knobs.segment_length

    def make(self, base_model: Any, knobs: Knobs, seed: int = 0) -> Any:
        """The untrained RMT at ``knobs`` around the base decoder (its weights as they are)."""
        from msrnn.rmt.wrapper import MemoryWrapper

        return MemoryWrapper.wrap(base_model.train(), **knobs.sizing())

    def as_lm(self, model: Any) -> Any:
        from msrnn.rmt.lm import RMTLM

        return RMTLM(model)

    def apply(self, lm: Any, knobs: Knobs) -> Any:
        """Untrained memory tokens around a loaded plain decoder (what ``bench stream --family rmt`` streams)."""
        from msrnn.models.hf import HFCausalLM
        from msrnn.rmt.lm import RMTLM
        from msrnn.rmt.wrapper import MemoryWrapper

        if type(lm) is not HFCausalLM:  # a SUPRA/BST/RMT model has no plain decoder to wrap
            raise ConfigError(f"RMT memory wraps a plain decoder; this is a {type(lm).__name__}, not a plain HF "
                              "causal LM")
        return RMTLM(MemoryWrapper.wrap(lm.model, **knobs.sizing()), lm.tokenizer)

    def load(self, path: str | Path, **options: Any) -> Any:
        from msrnn.rmt.lm import load_rmt

        return load_rmt(path, **options)

    def load_trainable(self, path: Path) -> Any:
        """A saved RMT as its trainable wrapper."""
        from msrnn.rmt.lm import load_rmt

        return load_rmt(str(path)).wrapper

    def final_logits(self, model: Any, input_ids: Any, attention_mask: Any = None) -> Any:
        """The wrapper's own: segments aligned to the end of the (left-padded) sample, called through ``forward``
        so a DistributedDataParallel wrapper synchronises the gradients (``train rmt`` under several processes)."""
        return model(input_ids=input_ids, attention_mask=attention_mask, final=True)["logits"]

    def task_head(self, model: Any) -> str:
        return "classifier" if model.config.backbone_kind == "encoder" else "lm"

    def record_task(self, model: Any, task: str, labels: list[str]) -> None:
        """An RMT's config names its task and labels (``msrnn eval task`` checks it is asked the same one)."""
        model.config.task, model.config.label_names = task, list(labels)

    def answers_itself(self, lm: Any) -> bool:
        return True  # RMTLM.final_logits: scored as it was trained (streaming cuts segments from the start)

    def trained_task(self, lm: Any) -> tuple[str | None, int | None]:
        """The task and segment length an RMT's config records (``msrnn train rmt`` and task tuning set them)."""
        from msrnn.rmt.lm import RMTLM

        config = lm.wrapper.config if isinstance(lm, RMTLM) else lm.config  # a decoder's wrapper or an encoder
        return config.task, config.segment_length
