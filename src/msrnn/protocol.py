"""The one streaming interface every msrnn family implements.

"Transformers are Multi-State RNNs" (Oren et al., 2024) views a decoder's KV cache as an RNN state. msrnn
makes that literal: every model, whatever bounds its state, is driven as

    state = lm.init_state(batch_size)
    logits, state = lm.forward_chunk(input_ids, state)   # input_ids [B, T], any T >= 1; logits [B, T, V]
    lm.state_nbytes(state)                                # bytes held for B sequences

``forward_chunk(input_ids, state, last_only=True)`` returns only the logits after the chunk's last token [B, 1, V]:
a prompt being read needs no others, and the head over every position is the largest tensor of a prefill (T x V
floats: 4 GiB for 8k tokens at a 128k vocabulary). The keyword is optional for adapters written elsewhere:
:func:`stream_chunks` passes it only where ``forward_chunk`` declares it, and slices the last row otherwise.

Chunking must not change the function: feeding a stream in chunks of any size gives the logits of one full
forward (up to float tolerance; eviction families document where their policy makes chunking matter).
The state passed to ``forward_chunk`` may be updated in place: always continue with the returned one.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from msrnn.errors import ConfigError


@runtime_checkable
class StatefulLM(Protocol):
    """A language model driven chunk by chunk with an explicit state.

    msrnn's adapters also name their family (``family = "supra"``): callers that need a family-specific answer ask
    that family's spec (:func:`msrnn.families.lm_family`); an adapter written elsewhere that names none is driven
    as a plain streaming model."""

    vocab_size: int

    def init_state(self, batch_size: int) -> Any:
        """A fresh state for ``batch_size`` sequences, before any token."""
        ...

    def forward_chunk(self, input_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Consume ``input_ids`` [B, T] and return next-token logits [B, T, V] (fp32) and the new state.

        msrnn's adapters also take ``last_only: bool = False`` (logits [B, 1, V] after the last token only)."""
        ...

    def state_nbytes(self, state: Any) -> int:
        """Bytes of tensor memory the state holds (all B sequences together)."""
        ...


def tensor_nbytes(obj: Any) -> int:
    """Sum the bytes of every tensor reachable through lists, tuples, dicts and object attributes."""
    seen: set[int] = set()

    def visit(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            # Views of one storage (e.g. a slice kept in two places) are counted once.
            key = x.untyped_storage().data_ptr() if x.numel() else id(x)
            if key in seen:
                return 0
            seen.add(key)
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(visit(v) for v in x.values())
        if isinstance(x, (list, tuple, set)):
            return sum(visit(v) for v in x)
        if hasattr(x, "__dict__") and not isinstance(x, (type, torch.nn.Module)):
            return sum(visit(v) for v in vars(x).values())
        return 0

    return visit(obj)


def check_batch_size(batch_size: int) -> int:
    """Validate ``init_state``'s argument: a positive int (``True`` and floats are refused, not coerced)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}; call init_state(1) for one sequence")
    return batch_size


def check_state(state: Any, kind: type | tuple[type, ...], owner: str | None = None) -> None:
    """Refuse a missing or foreign state (``None``, another family's, or one another model made) before a family
    reads it. ``owner`` is the adapter's :func:`owner` stamp: a bounded model fed a plain model's cache would run
    unbounded, and another model's state would be read as this one's."""
    if not isinstance(state, kind):
        raise ConfigError(f"state must be what this model's init_state returned, got {type(state).__name__}; "
                          "start with state = lm.init_state(batch_size)")
    if owner is not None:
        made_by = state.get("owner") if isinstance(state, dict) else getattr(state, "owner", None)
        if made_by != owner:
            raise ConfigError(f"this state was made by another model or setting ({made_by or 'unknown'}), not by "
                              f"this one ({owner}); start with state = lm.init_state(batch_size)")


def owner(adapter: Any, model: Any, *settings: Any) -> str:
    """The stamp an adapter puts on the states it makes: its class, the model it drives and what bounds the state."""
    tail = "".join(f":{s}" for s in settings)
    return f"{type(adapter).__name__}@{id(model):x}{tail}"


def check_chunk(input_ids: torch.Tensor, batch_size: int | None = None,
                vocab_size: int | None = None) -> torch.Tensor:
    """Validate a chunk before a family touches it (shape, integer dtype, batch size, ids in range); returns it as
    int64 ids.

    Out-of-range ids would be an IndexError on CPU and a device-side assert (a dead CUDA context) on a GPU."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ConfigError("input_ids must be a 2-D LongTensor [batch, tokens]; reshape it with input_ids.view(B, -1)")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ConfigError(f"input_ids must hold integer token ids, got {input_ids.dtype}; convert with .long()")
    if input_ids.shape[1] < 1:
        raise ConfigError("a chunk needs at least one token; skip empty chunks before calling forward_chunk")
    if batch_size is not None and input_ids.shape[0] != batch_size:
        raise ConfigError(
            f"chunk has batch size {input_ids.shape[0]} but the state was made for {batch_size}; "
            "start a new state with init_state(batch_size)"
        )
    if vocab_size is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ConfigError(f"token id {bad} is outside this model's vocabulary [0, {vocab_size}); "
                              "tokenize with the model's own tokenizer")
    return input_ids.long()  # uint8/int16/int32 ids index embeddings as int64


@dataclass
class StreamStep:
    """One chunk of a stream: where it starts, its logits [B, t, V], the state after it, and the seconds spent
    inside ``forward_chunk`` (what a throughput figure should count)."""

    start: int
    logits: torch.Tensor
    state: Any
    seconds: float


def split(input_ids: torch.Tensor, chunk_sizes: Iterable[int] | int) -> Iterator[torch.Tensor]:
    """The chunks of ``input_ids`` [B, T]: one size for every chunk, or a list of sizes (the last one repeats)."""
    sizes = [chunk_sizes] if isinstance(chunk_sizes, int) else list(chunk_sizes)
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError("chunk sizes must be >= 1; pass e.g. --chunk-size 128")
    pos, i = 0, 0
    while pos < input_ids.shape[1]:
        size = sizes[min(i, len(sizes) - 1)]
        yield input_ids[:, pos : pos + size]
        pos, i = pos + size, i + 1


def accepts_keyword(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` declares the keyword ``name`` (read off its signature: verified, not assumed)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def takes_last_only(lm: StatefulLM) -> bool:
    """Whether ``lm.forward_chunk`` declares ``last_only`` (read at each stream, since a caller may have replaced the
    method; an adapter written elsewhere without it is still driven, with the last row sliced off its full
    logits)."""
    return accepts_keyword(lm.forward_chunk, "last_only")


def stream_chunks(lm: StatefulLM, chunks: Iterable[torch.Tensor], state: Any = None,
                  last_only: bool = False) -> Iterator[StreamStep]:
    """The one streaming loop: feed ``chunks`` ([B, t] each) through ``lm``, from ``state`` or a fresh one.

    ``last_only``: each step's logits are those after its chunk's last token only, [B, 1, V] (reading a prompt;
    the model skips its head on the other positions where its adapter supports it).
    The evaluator, generator, task scorer, harness, benchmarks and studies all drive models through this."""
    start = 0
    native = last_only and takes_last_only(lm)
    for chunk in chunks:
        if state is None:
            state = lm.init_state(chunk.shape[0])
        t0 = time.perf_counter()
        if native:
            logits, state = lm.forward_chunk(chunk, state, last_only=True)
        else:
            logits, state = lm.forward_chunk(chunk, state)
            if last_only:
                logits = logits[:, -1:]
        yield StreamStep(start, logits, state, time.perf_counter() - t0)
        start += chunk.shape[1]


def fork_state(state: Any) -> Any:
    """An independent copy of a state: continue one read context several ways (several questions, candidate
    answers) without reading it again. A state may be updated in place, so a continuation always runs on a copy."""
    import copy

    return copy.deepcopy(state)


def prefill(lm: StatefulLM, input_ids: torch.Tensor, chunk_size: int, state: Any = None) -> tuple[torch.Tensor, Any]:
    """Feed a whole prompt in chunks; returns (the next-token logits after its last token [B, V], the state).

    Only those logits are computed (``last_only``): generation and the probes read nothing else."""
    last = None
    for last in stream_chunks(lm, split(input_ids, chunk_size), state, last_only=True):  # noqa: B007 - the last
        pass
    if last is None:
        raise ConfigError("the prompt is empty; give at least one token")
    return last.logits[:, -1], last.state


def stream_logits(lm: StatefulLM, input_ids: torch.Tensor, chunk_sizes: Iterable[int] | int) -> torch.Tensor:
    """Feed ``input_ids`` [B, T] through ``lm`` in chunks and concatenate the logits [B, T, V].

    ``chunk_sizes`` is one size for every chunk or an explicit list of sizes (the last one is repeated).
    A test helper and a building block for evaluators.
    """
    return torch.cat([step.logits for step in stream_chunks(lm, split(input_ids, chunk_sizes))], dim=1)


_PROFILES: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


def chunk_held_nbytes(lm: StatefulLM, state: Any) -> int:
    """The most bytes the state held at any offset during the chunk that produced ``state`` (all sequences).

    For most families that is the state at the chunk's end. A model whose state grows inside a chunk and shrinks
    at its end (KV eviction with ``oneshot`` or ``chunked:C`` prefill, which evict once per chunk or group, so a
    query late in the chunk attends the chunk's earlier tokens on top of the budget) reports the larger figure
    through an optional ``chunk_peak_nbytes(state)``; evaluations take the peak through this function."""
    held = lm.state_nbytes(state)
    extra = getattr(lm, "chunk_peak_nbytes", None)
    return max(held, extra(state)) if extra is not None else held


def peak_state_bytes(lm: StatefulLM, tokens: int, chunk_end_peak: int) -> int:
    """The peak state of one sequence over its first ``tokens`` tokens, given the most seen between chunks.

    A family whose state never shrinks from one token to the next declares ``monotone_state = True`` (the full
    cache, KV eviction, SUPRA): its peak is at the last offset, which a chunked stream sees, so the chunk-end
    figure (taken with :func:`chunk_held_nbytes`, which also sees a KV prefill's in-chunk slots) is exact and
    costs nothing. Every other family (BST, RMT drop keys at boundaries) is profiled token by
    token (:func:`state_bytes_profile`)."""
    if getattr(lm, "monotone_state", False):
        return chunk_end_peak
    return max(chunk_end_peak, max(state_bytes_profile(lm, tokens), default=0))


def state_bytes_profile(lm: StatefulLM, tokens: int) -> list[int]:
    """Bytes of one sequence's state after each of its first ``tokens`` tokens, fed one token per call.

    This is the state at *every* offset, which is what "peak state bytes" means: a model that drops its block or
    segment keys at each boundary looks smaller if it is only looked at between chunks that end on boundaries.
    State sizes depend on the offset, not on the tokens, so a random stream measures any document's. Memoised per
    model (a longer request recomputes), since evaluations ask once per call."""
    try:
        cached = _PROFILES.get(lm)
    except TypeError:  # not weak-referenceable: measure every time
        cached = None
    if cached is not None and len(cached) >= tokens:
        return cached[:tokens]
    g = torch.Generator().manual_seed(0)
    chunks = (torch.randint(0, lm.vocab_size, (1, 1), generator=g) for _ in range(tokens))
    with torch.inference_mode():
        sizes = [lm.state_nbytes(step.state) for step in stream_chunks(lm, chunks)]
    with contextlib.suppress(TypeError):
        _PROFILES[lm] = sizes
    return sizes


def measure_state_bytes(lm: StatefulLM, tokens: int = 2048, chunk: int = 1) -> int:
    """Peak state bytes of one sequence over a random stream: the bound a family really needs.

    The default, one token per call, sees the state at every offset inside a block or segment (a model that
    drops its block keys at each block end looks smaller if it is only measured at block ends; any chunk that
    divides the block size misses the peak). Larger chunks are for policies whose state does not depend on
    offsets, or to see what a prefill of that size holds."""
    if chunk == 1:
        return max(state_bytes_profile(lm, tokens), default=0)
    g = torch.Generator().manual_seed(0)
    chunks = (torch.randint(0, lm.vocab_size, (1, chunk), generator=g) for _ in range(0, tokens, chunk))
    with torch.inference_mode():
        return max((chunk_held_nbytes(lm, step.state) for step in stream_chunks(lm, chunks, last_only=True)),
                   default=0)
