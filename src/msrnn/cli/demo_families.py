"""``msrnn demo --families``: the same base model bounded four ways, trained briefly and compared at equal bytes.

Each bounded model is cached next to the demo's base model (named from the base model and the step count), so a
second run only evaluates. The budgets are small on purpose: this shows the pipeline and the state sizes on a
fresh machine in minutes; the README's tables come from longer runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from msrnn.ui import err_console


def _supra(base: Path, out: Path, steps: int, progress: bool, data: str) -> None:
    from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for
    from msrnn.supra import convert
    from msrnn.train import TrainConfig
    from msrnn.train.pretrain import PretrainConfig, train_lm

    model = convert(load_hf_causal_lm(base)).train()
    train_lm(model, load_tokenizer_for(base), PretrainConfig(data=data, seq_len=512, batch_size=4, val_batches=2),
             TrainConfig(max_steps=steps, lr=1e-3, warmup_steps=max(1, steps // 10), eval_every=0), out,
             {"family": "supra", "uptrained_from": str(base)}, progress=progress)


def _bst(base: Path, out: Path, steps: int, progress: bool, data: str) -> None:
    import torch

    from msrnn.bst import BSTConfig, BSTForCausalLM
    from msrnn.models.loading import load_tokenizer_for, read_meta
    from msrnn.train import TrainConfig
    from msrnn.train.pretrain import PretrainConfig, train_lm

    tok = load_tokenizer_for(base)
    preset_name = read_meta(base).get("preset", "small")
    cfg = BSTConfig.from_preset(preset_name, len(tok), block_size=32, variant="sh", filter_length=256)
    torch.manual_seed(0)
    train_lm(BSTForCausalLM(cfg), tok, PretrainConfig(preset=preset_name, data=data, seq_len=256, batch_size=8,
                                                                    val_batches=2),
             TrainConfig(max_steps=steps, lr=2e-3, warmup_steps=max(1, steps // 10), eval_every=0), out,
             {"family": "bst", "name": cfg.name}, progress=progress)


def _rmt(base: Path, out: Path, steps: int, progress: bool, data: str) -> None:
    from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for
    from msrnn.rmt import MemoryWrapper
    from msrnn.rmt.training import TaskTrainConfig, train_task
    from msrnn.train import TrainConfig
    from msrnn.train.curriculum import CurriculumConfig

    w = MemoryWrapper.wrap(load_hf_causal_lm(base).train(), num_memory_tokens=8, segment_length=128)
    train_task(w, load_tokenizer_for(base), TaskTrainConfig(task="memorize", batch_size=8, val_samples=16),
               CurriculumConfig(max_segments=2, threshold=0.9, stage_steps=max(1, steps // 2)),
               TrainConfig(max_steps=steps, lr=1e-3, warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 6)),
               out, {"source": str(base)}, progress=progress)


def families_section(base: Path, root: Path, steps: int, out: Path, progress: bool, max_tokens: int = 1024,
                     data: str = "stdlib") -> dict[str, Any]:
    """Train (or reuse) SUPRA, BST:SH and an RMT around ``base``, then ``msrnn compare`` them with KV eviction."""
    from msrnn.compare import CompareConfig, compare

    dirs = []
    for name, build in (("supra", _supra), ("bst", _bst), ("rmt", _rmt)):
        d = root / f"{base.name}-{name}-s{steps}"
        if not (d / "msrnn.json").exists():
            err_console.print(f"[bold]msrnn demo[/]: training the {name} model ({steps} steps); cached at {d}")
            build(base, d, steps, progress, data)
        dirs.append(str(d))
    cfg = CompareConfig(base=str(base), models=dirs, policies=["window", "tova"], max_tokens=max_tokens,
                        max_docs=4, task="memorize", task_segments=[1, 4, 16], task_samples=16,
                        profile_tokens=1024, probe_tokens=1024)
    return compare(cfg, out / "compare", progress=progress)
