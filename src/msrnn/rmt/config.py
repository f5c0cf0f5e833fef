"""The RMT model config: the backbone's own config plus the memory settings, saved in ``config.json``."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from msrnn.errors import ConfigError

BACKBONE_KINDS = ("decoder", "encoder")


class RMTConfig(PretrainedConfig):
    """Recurrent Memory Transformer settings (Bulatov et al., 2022; 2023).

    ``backbone`` is the wrapped model's config as a dict (``None`` only while a wrapper is being built around a
    live model). ``bptt_depth`` -1 is full BPTT; k >= 1 connects only the last k segments through memory.
    ``num_labels`` > 0 adds a classification head (the encoder variant's [CLS] classifier); ``label_names`` and
    ``task`` record what a task-trained model answers, so evaluation can check it is asked the same task.
    """

    model_type = "msrnn_rmt"

    def __init__(self, backbone: dict[str, Any] | None = None, backbone_kind: str = "decoder",
                 num_memory_tokens: int = 16, segment_length: int = 512, bptt_depth: int = -1,
                 task: str | None = None, label_names: list[str] | None = None, **kwargs: Any) -> None:
        if backbone_kind not in BACKBONE_KINDS:
            raise ConfigError(f"backbone_kind must be one of {BACKBONE_KINDS}, got {backbone_kind!r}")
        for name, value in (("num_memory_tokens", num_memory_tokens), ("segment_length", segment_length),
                            ("bptt_depth", bptt_depth)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if num_memory_tokens < 1:
            raise ConfigError("num_memory_tokens must be >= 1 (zero memory tokens is a plain segmented model)")
        if segment_length < 1:
            raise ConfigError("segment_length must be >= 1")
        if bptt_depth == 0 or bptt_depth < -1:
            raise ConfigError(f"bptt_depth must be -1 (full) or >= 1, got {bptt_depth}")
        self.backbone = backbone
        self.backbone_kind = backbone_kind
        self.num_memory_tokens = num_memory_tokens
        self.segment_length = segment_length
        self.bptt_depth = bptt_depth
        self.task = task
        self.label_names = list(label_names) if label_names else None
        super().__init__(**kwargs)

    def backbone_config(self) -> PretrainedConfig:
        """The wrapped decoder's config, rebuilt from the saved dict."""
        from transformers import AutoConfig

        if not self.backbone:
            raise ConfigError("this RMT config has no backbone config; build it with MemoryWrapper.wrap(model, ...)")
        data = dict(self.backbone)
        return AutoConfig.for_model(data.pop("model_type"), **data)


def max_positions(config: Any) -> int | None:
    """The backbone's position limit, or None when it has none."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
