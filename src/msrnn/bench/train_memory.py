"""Peak memory of one training step at a real model's shape, counted without running it (``msrnn bench
train-memory``).

The model is built and trained for two steps (forward, backward, AdamW) under ``FakeTensorMode``: every tensor has
its shape, dtype and storage but no data, so a 1B-parameter step at 8k tokens is counted in seconds on a laptop.
:class:`LiveTensorBytes` sees every tensor an operator returns, counts its storage once (views share it) until the
storage is freed, and keeps the peak. What it measures is the bytes of live tensors, the quantity a CUDA caching
allocator must hold at least (allocator rounding and fragmentation, and the CUDA context, come on top); it is
tested equal to PyTorch's own ``MemTracker`` on real tensors.

Rows compare, at each length, the loss on full logits without activation checkpointing (what msrnn trained with
before) against the chunked loss (:mod:`msrnn.train.loss`) and each layer recomputed in backward. The second step
is the one measured (AdamW's states exist before it starts, as in a long run). "Kept for backward" is what the forward
holds when it returns (activations, the loss's logits, the bf16 copies of weights that autocast made); its per-token
figure is the slope between the two longest lengths, so the parts that do not grow with length drop out. The peaks of
forward + backward and of the whole step (AdamW included) are shown beside it.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive now and at the peak, over the operators run inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage pointer -> bytes
        self.now = 0
        self.peak = 0

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.now

    def _free(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.now -= nbytes

    def track(self, tensors: Any) -> None:
        """Count tensors made before the mode was entered (a model's weights) as alive."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    nbytes = storage.nbytes()
                    self.live[key] = nbytes
                    self.now += nbytes
                    weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


@dataclass
class MemoryRow:
    """One measured configuration."""
    family: str
    tokens: int
    loss: str  # full | chunked
    activation_checkpointing: bool
    weights_mib: float  # the weights as trained (fp32 masters under bf16-mixed)
    saved_mib: float  # what the forward holds for the backward when it returns (activations, logits)
    saved_kib_per_token: float
    backward_peak_mib: float  # forward and backward of the second step (AdamW's states already held)
    step_peak_mib: float  # the whole second step: forward, backward and AdamW
    seconds: float  # to count it (no compute happens)


def _model(family: str, shape: str, vocab: int) -> torch.nn.Module:
    """A random model of ``shape`` as ``family``'s trainable module at its default knobs (the softmax Llama itself
    for ``hf``, its SUPRA conversion, a BST or an RMT built from it)."""
    from msrnn.families import FAMILIES
    from msrnn.models.presets import build_model

    spec = FAMILIES.get(family)
    return spec.make(build_model(shape, vocab), spec.knobs())


def measure(family: str, shape: str, vocab: int, tokens: int, chunked: bool, checkpointing: bool,
            precision: str = "bf16-mixed", chunk_tokens: int = 1024, batch_size: int = 1) -> MemoryRow:
    """Count one configuration (see the module doc): two training steps, the second one measured."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from msrnn.train.loss import ChunkedLMLoss
    from msrnn.train.trainer import cast_for_training, default_loss, enable_activation_checkpointing

    t0 = time.perf_counter()
    counter = LiveTensorBytes()
    with FakeTensorMode():
        # Built before counting starts (a conversion swaps tensors, which a watched storage forbids), then counted.
        try:
            model = _model(family, shape, vocab).train()
        except RuntimeError as exc:  # a conversion that swaps tensors in place (BST's keeps its SSM in fp32)
            from msrnn.errors import ConfigError

            raise ConfigError(f"the {family} family's model cannot be built on fake tensors ({str(exc).splitlines()[0]}"
                              "); measure hf, supra or rmt") from None
        cast_for_training(model, precision)
        if checkpointing:
            enable_activation_checkpointing(model)
        counter.track([p for p in model.parameters()] + [b for b in model.buffers()])
        weights = counter.now
        with counter:  # every tensor the step makes, from here
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            loss_fn = ChunkedLMLoss(chunk_tokens, verify=False) if chunked else default_loss  # no values to check
            ids = torch.randint(0, vocab, (batch_size, tokens))
            batch = {"input_ids": ids, "labels": ids}
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
            for step in range(2):
                if step == 1:
                    counter.reset_peak()
                before = counter.now
                with autocast:
                    loss = loss_fn(model, batch)
                saved = counter.now - before  # what the forward keeps for the backward
                loss.backward()
                backward_peak = counter.peak
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
    return MemoryRow(family, tokens, "chunked" if chunked else "full", checkpointing, round(weights / MIB, 1),
                     round(saved / MIB, 1), round(saved / tokens / 1024, 1), round(backward_peak / MIB, 1),
                     round(counter.peak / MIB, 1), round(time.perf_counter() - t0, 2))


def run(families: list[str], shape: str, vocab: int, lengths: list[int], precision: str = "bf16-mixed",
        chunk_tokens: int = 1024, progress: Any = None) -> dict[str, Any]:
    """Every family x length x (before, after), and the per-token slopes between the two longest lengths."""
    configs = [(False, False), (True, False), (True, True)]  # before; chunked loss; + activation checkpointing
    rows: list[MemoryRow] = []
    for family in families:
        for tokens in lengths:
            for chunked, ac in configs:
                rows.append(measure(family, shape, vocab, tokens, chunked, ac, precision, chunk_tokens))
                if progress is not None:
                    progress()
    per_token = []
    if len(lengths) >= 2:
        lo, hi = sorted(lengths)[-2:]
        for family in families:
            for chunked, ac in configs:
                pick = {r.tokens: r for r in rows if r.family == family and r.loss == ("chunked" if chunked else
                                                                                       "full")
                        and r.activation_checkpointing == ac}
                slope = (pick[hi].saved_mib - pick[lo].saved_mib) * MIB / (hi - lo)
                per_token.append({"family": family, "loss": pick[hi].loss, "activation_checkpointing": ac,
                                  "kib_per_token": round(slope / 1024, 1), "between": [lo, hi]})
    return {"bench": "train-memory", "shape": shape, "vocab": vocab, "precision": precision,
            "chunk_tokens": chunk_tokens, "method": "live tensor bytes under FakeTensorMode (no compute)",
            "rows": [asdict(r) for r in rows], "per_token": per_token}
