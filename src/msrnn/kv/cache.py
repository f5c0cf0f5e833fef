"""A ``transformers.Cache`` whose layers keep at most ``budget`` KV slots: a bounded multi-state RNN.

Mechanics live here; policies only score (see :mod:`msrnn.kv.policies`). Per layer we keep, next to keys and
values, each slot's original token position (``-1`` for padding), a validity flag and, for H2O, the
accumulated attention. ``update`` appends the new tokens and returns every slot; the msrnn attention function
(:mod:`msrnn.kv.attention`) then attends, scores and calls :meth:`EvictionLayer.commit` with the slots to keep,
so between forwards a layer holds at most ``budget`` slots (with ``storage='fixed'``, ``budget`` tokens in a
``budget + 1`` slot buffer once decoding in place: the new token is written into the free slot and the evicted
slot becomes the free one, so a decode step copies nothing and its tensor shapes stay constant).

Conventions (Oren et al., 2024, official code): keys keep their original RoPE positions; ``get_seq_length``
returns tokens seen, not slots kept, because transformers uses it as the query offset of the causal mask.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from msrnn.errors import ConfigError, MsrnnError
from msrnn.kv.policies import Candidates, Policy
from msrnn.kv.rope import Rotation


class _ActiveLayer:
    """The layer whose ``update`` ran last: the attention call that follows belongs to it.

    Per thread (a ContextVar) when running eagerly. Under ``torch.compile`` a plain attribute instead, because
    Dynamo cannot trace ``ContextVar.set`` (a graph break in every layer); Dynamo traces the attribute and
    replays its writes, and a compiled graph runs in the thread that called it."""

    def __init__(self) -> None:
        self._var: contextvars.ContextVar[EvictionLayer | None] = contextvars.ContextVar("msrnn_active_kv_layer",
                                                                                         default=None)
        self._traced: EvictionLayer | None = None
        self._consumed: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
            "msrnn_consumed_kv_keys", default=None)

    def get(self) -> EvictionLayer | None:
        return self._traced if torch.compiler.is_compiling() else self._var.get()

    def set(self, layer: EvictionLayer | None) -> None:
        if torch.compiler.is_compiling():
            self._traced = layer
        else:
            self._var.set(layer)
            self._consumed.set(None)  # a new layer's keys: the previous layer's call is over

    def mark_consumed(self, key: torch.Tensor) -> None:
        """Remember the keys the evicting call just attended (eagerly), so a second call with them is caught."""
        if not torch.compiler.is_compiling():
            self._consumed.set(key)

    def consumed(self, key: torch.Tensor) -> bool:
        """Whether ``key`` was already attended by an evicting call of this layer (a second attention call)."""
        return not torch.compiler.is_compiling() and self._consumed.get() is key


ACTIVE_LAYER = _ActiveLayer()

POSITION_MODES = ("original", "rolling")
# naive: keys/values rebuilt chronologically at every step (the readable twin). fixed: once a layer is full, decode
# steps write into a preallocated budget + 1 slot buffer in place and evict by marking a slot free (no copies).
STORAGE_MODES = ("naive", "fixed")
_NO_POSITION = torch.iinfo(torch.long).max  # sorts after every real position


def check_storage(storage: str, positions: str = "original") -> None:
    """Refuse an unknown storage mode, and fixed storage with rolling positions: rolling re-rotates every kept key at
    every step, so nothing can stay in place and the fixed buffer would never be used."""
    if storage not in STORAGE_MODES:
        raise ConfigError(f"unknown storage {storage!r}; use {' or '.join(STORAGE_MODES)}")
    if storage == "fixed" and positions == "rolling":
        raise ConfigError("storage='fixed' decodes in place, which positions='rolling' rules out (every kept key is "
                          "re-rotated at every step); use storage='naive' with rolling positions")


def check_compile(policy: Policy, storage: str) -> None:
    """Refuse ``compile=True`` where there is no constant-shape decode step to capture."""
    if storage != "fixed":
        raise ConfigError("compile captures the in-place decode step of fixed storage; add storage='fixed' "
                          "(--storage fixed)")
    if policy.budget is None:
        raise ConfigError("compile captures the decode step of a bounded cache; name a policy with a budget")


def check_options(policy: Policy, prefill: str = "exact", positions: str = "original", storage: str = "naive",
                  compile: bool = False) -> None:
    """Every check of how a bounded cache runs, in one place: :class:`~msrnn.kv.KVSettings`, the cache and the
    engine all call this (each error is written once)."""
    parse_prefill(prefill)
    if positions not in POSITION_MODES:
        raise ConfigError(f"unknown positions mode {positions!r}; use {' or '.join(POSITION_MODES)}")
    check_storage(storage, positions)
    if not isinstance(compile, bool):
        raise ConfigError(f"compile must be true or false, not {compile!r}")
    if compile:
        check_compile(policy, storage)
    if positions == "rolling" and policy.per_head:
        raise ConfigError("positions='rolling' needs one selection per layer; drop the per-head option")


def parse_prefill(mode: str) -> int | None:
    """Check a prefill mode; returns C for ``chunked:C`` (evict once per C tokens), None for exact and oneshot."""
    if mode in ("exact", "oneshot"):
        return None
    name, _, c = mode.partition(":")
    if name == "chunked" and c.isdigit() and int(c) >= 1:
        return int(c)
    raise ConfigError(f"unknown prefill mode {mode!r}; use exact, oneshot or chunked:C (C >= 1 tokens per "
                      "eviction, e.g. chunked:64)")


@dataclass
class SlotTable:
    """Each slot's bookkeeping next to its key and value, for G selection groups (1, or one per KV head): the
    token's original position (-1 = padding), whether it is real, and H2O's accumulated attention (None for other
    policies). Every operation that moves slots moves all three together, through these methods."""

    positions: torch.Tensor  # [B, G, S] long
    valid: torch.Tensor  # [B, G, S] bool
    acc: torch.Tensor | None  # [B, G, S] float32 (H2O only)

    @classmethod
    def empty(cls, B: int, G: int, device: torch.device, with_acc: bool) -> SlotTable:
        """No slots yet."""
        return cls(torch.zeros((B, G, 0), dtype=torch.long, device=device),
                   torch.zeros((B, G, 0), dtype=torch.bool, device=device),
                   torch.zeros((B, G, 0), dtype=torch.float32, device=device) if with_acc else None)

    @property
    def groups(self) -> int:
        return self.positions.shape[1]

    def append(self, positions: torch.Tensor, valid: torch.Tensor) -> SlotTable:
        """The table with T new slots at the end: ``positions``/``valid`` [B, T] (the same for every group), no
        attention accumulated yet."""
        B, G, T = positions.shape[0], self.groups, positions.shape[1]
        return SlotTable(torch.cat([self.positions, positions[:, None].expand(B, G, T)], dim=2),  # [B, G, S + T]
                         torch.cat([self.valid, valid[:, None].expand(B, G, T)], dim=2),
                         None if self.acc is None else torch.cat([self.acc, self.acc.new_zeros(B, G, T)], dim=2))

    def append_free(self) -> SlotTable:
        """One more slot, empty: a fixed buffer's free slot (its position sorts after every real one)."""
        B, G = self.positions.shape[:2]
        return SlotTable(torch.cat([self.positions, self.positions.new_full((B, G, 1), _NO_POSITION)], dim=2),
                         torch.cat([self.valid, self.valid.new_ones(B, G, 1)], dim=2),
                         None if self.acc is None else torch.cat([self.acc, self.acc.new_zeros(B, G, 1)], dim=2))

    def gather(self, idx: torch.Tensor) -> SlotTable:
        """The slots at indices ``idx`` [B, G, k]."""
        return SlotTable(self.positions.gather(2, idx), self.valid.gather(2, idx),
                         None if self.acc is None else self.acc.gather(2, idx))

    def write(self, slot: torch.Tensor, position: torch.Tensor) -> None:
        """Fixed storage: a new real token at ``slot`` [B, G] with original ``position`` [B], in place."""
        self.positions.scatter_(2, slot[..., None], position[:, None, None].expand_as(slot[..., None]))
        self.valid.scatter_(2, slot[..., None], True)  # the slot may have held padding
        if self.acc is not None:
            self.acc.scatter_(2, slot[..., None], 0.0)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SlotTable:
        """``fn`` applied to every field along the batch (repeat, select sequences)."""
        return SlotTable(fn(self.positions), fn(self.valid), None if self.acc is None else fn(self.acc))

    def candidates(self, last: torch.Tensor | None = None, member: torch.Tensor | None = None) -> Candidates:
        """What a policy may look at, with the newest query's attention ``last`` (TOVA)."""
        return Candidates(self.positions, self.valid, self.acc, last, member)

    def tensors(self) -> list[torch.Tensor | None]:
        """The fields, for counting bytes."""
        return [self.positions, self.valid, self.acc]


def _select_slots(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] -> [B, H, k, D] at slot indices keep [B, G, k] (G = 1: the same slots for every head)."""
    B, H, _, D = x.shape
    if keep.shape[1] == 1:
        # index_select is several times faster than a gather through an index expanded over heads and channels.
        if B == 1:
            return x.index_select(2, keep[0, 0])
        return torch.stack([x[b].index_select(1, keep[b, 0]) for b in range(B)])
    return x.gather(2, keep[..., None].expand(-1, -1, -1, D))


class EvictionLayer(DynamicLayer):
    """One layer of a bounded KV cache."""

    is_croppable = False

    def __init__(self, policy: Policy, prefill: str = "exact", positions: str = "original",
                 rotation: Rotation | None = None, ref: bool = False, storage: str = "naive") -> None:
        super().__init__()
        self.policy = policy
        self.storage = storage
        self.prefill = prefill
        self.prefill_chunk = parse_prefill(prefill)
        self.ref = ref  # exact prefill through the slow readable twin (tests compare the two)
        self.rolling = positions == "rolling"
        self.rotation = rotation  # this layer's RoPE (rolling positions re-rotate with it; None: never rotated)
        self.seen = 0
        self._awaiting_commit = False
        self.slots: SlotTable | None = None  # each slot's position, validity and H2O sum
        self.counter: torch.Tensor | None = None  # [B] valid tokens seen (next original position)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.all_valid = True  # no padding slot was ever added (lets decoding skip masks)
        # Fixed storage only: [B, G] the slot the next token is written into; None while the layout is the naive,
        # chronological one (before the layer is full, with padding, rolling positions, or for a multi-token chunk).
        self.free: torch.Tensor | None = None
        # The most slots carried from one token to the next during the last forward (per sequence): the budget, or
        # less, for exact prefill and decoding; more for oneshot/chunked:C, which evict once per chunk or group.
        self.chunk_peak_slots = 0

    @property
    def budget(self) -> int | None:
        """Slots this layer keeps (per KV head for per-head policies); None means unbounded."""
        return self.policy.budget

    def groups(self, num_kv_heads: int) -> int:
        """How many independent selections a layer makes: one per KV head, or one."""
        return num_kv_heads if self.policy.per_head else 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate empty buffers shaped like the first keys (transformers' layer hook)."""
        B, H, _, D = key_states.shape
        dev = key_states.device
        G = self.groups(H)
        self.dtype, self.device = key_states.dtype, dev
        self.keys = key_states.new_zeros((B, H, 0, D))
        self.values = value_states.new_zeros((B, H, 0, value_states.shape[-1]))
        self.slots = SlotTable.empty(B, G, dev, with_acc=self.policy.needs == "all")
        self.counter = torch.zeros(B, dtype=torch.long, device=dev)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return kept + new keys/values for attention; msrnn's attention then evicts and commits."""
        if self._awaiting_commit:
            raise MsrnnError(
                "the KV eviction cache was used without msrnn's attention function, so nothing was evicted; "
                "wrap the model with msrnn.kv.prepare_model(model) (or use msrnn.kv.KVEvictionLM)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0]:
            raise ConfigError(
                f"this cache holds {self.keys.shape[0]} sequences but got a batch of {key_states.shape[0]}; "
                "make a new cache for a different batch size"
            )
        if self._fixed_step(key_states):
            return self._write_in_place(key_states, value_states)
        if self.free is not None:
            self._to_naive()  # a multi-token chunk after fixed decoding: back to the chronological layout
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        self.pending = (full_k, full_v)
        self._awaiting_commit = True
        ACTIVE_LAYER.set(self)
        return full_k, full_v

    # -- fixed storage ----------------------------------------------------------------------------------------
    def _fixed_step(self, key_states: torch.Tensor) -> bool:
        """Whether this update is an in-place decode step: one token into a full layer (padding slots included:
        they are masked and evicted first, as in the naive layout)."""
        return (self.storage == "fixed" and key_states.shape[-2] == 1 and self.budget is not None
                and not self.rolling and (self.free is not None or self.keys.shape[-2] >= self.budget))

    def _to_fixed(self) -> None:
        """Chronological k slots -> a k + 1 slot buffer whose extra slot is free (one copy, once)."""
        B, H, _, D = self.keys.shape
        self.keys = torch.cat([self.keys, self.keys.new_zeros(B, H, 1, D)], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros(B, H, 1, self.values.shape[-1])], dim=2)
        self.slots = self.slots.append_free()
        self.free = torch.full((B, self.slots.groups), self.budget, dtype=torch.long, device=self.keys.device)

    def _write_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.free is None:
            self._to_fixed()
        B, H = key_states.shape[:2]
        idx = self.free if self.free.shape[1] == H else self.free.expand(B, H)  # [B, H] one slot per KV head
        self.keys.scatter_(2, idx[:, :, None, None].expand(B, H, 1, self.keys.shape[-1]), key_states)
        self.values.scatter_(2, idx[:, :, None, None].expand(B, H, 1, self.values.shape[-1]), value_states)
        self.slots.write(self.free, self.counter)
        self.pending = (self.keys, self.values)
        self._awaiting_commit = True
        ACTIVE_LAYER.set(self)
        return self.keys, self.values

    def commit_in_place(self, evict: torch.Tensor) -> None:
        """Fixed storage: slot ``evict`` [B, G] is the next free one (its contents are dropped, nothing moves)."""
        self.free = evict
        self.chunk_peak_slots = self.budget
        self.seen += 1
        self.counter = self.counter + 1
        self.pending = None
        self._awaiting_commit = False

    def _live_order(self) -> torch.Tensor:
        """[B, G, k] indices of the live slots of a fixed buffer in chronological order."""
        pos = self.slots.positions.scatter(2, self.free[..., None], _NO_POSITION)
        return pos.argsort(dim=-1)[..., : self.budget]

    def _to_naive(self) -> None:
        """A fixed buffer -> the k live slots in chronological order (the naive layout)."""
        keep = self._live_order()
        self.keys, self.values = _select_slots(self.keys, keep), _select_slots(self.values, keep)
        self.slots = self.slots.gather(keep)
        self.free = None

    def commit(self, keep: torch.Tensor | None, table: SlotTable, new_tokens: int,
               new_valid_counts: torch.Tensor | int, carried: int | None = None) -> None:
        """Keep candidate slots ``keep`` [B, G, k] (indices into old + new slots, ascending) of ``table`` (the old and
        new slots' bookkeeping); None keeps all. ``carried``: the most slots held between two of this forward's
        tokens (default: what is kept)."""
        full_k, full_v = self.pending
        kept = full_k.shape[-2] if keep is None else keep.shape[-1]
        self.chunk_peak_slots = max(kept, carried or 0)
        if keep is None:
            self.keys, self.values, self.slots = full_k, full_v, table
        else:
            self.keys, self.values = _select_slots(full_k, keep), _select_slots(full_v, keep)
            self.slots = table.gather(keep)
        self.seen += new_tokens
        self.counter = self.counter + new_valid_counts
        self.pending = None
        self._awaiting_commit = False

    # -- transformers Cache layer API -------------------------------------------------------------
    def get_seq_length(self) -> int:
        """Tokens seen (not slots kept): positions and masks continue from here."""
        return self.seen

    def num_slots(self) -> int:
        """Slots holding a token now (a fixed buffer's free slot is not one)."""
        return 0 if not self.is_initialized else self.keys.shape[-2] - (self.free is not None)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Mask columns = kept slots + new tokens; the offset makes the new tokens' columns line up with their
        # absolute indices. Kept slots need no mask from transformers: msrnn's attention builds its own.
        """(mask columns, offset) for transformers' mask builders: kept slots + new tokens."""
        phys = self.num_slots()
        return phys + query_length, self.seen - phys

    def get_max_length(self) -> int:
        """The budget, or -1 when unbounded."""
        return -1 if self.budget is None else self.budget

    def reset(self) -> None:
        """Forget every slot (a fresh sequence)."""
        super().reset()
        self.seen = 0
        self._awaiting_commit = False
        self.slots = self.counter = self.pending = self.free = None
        self.all_valid = True
        self.chunk_peak_slots = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Refused: evicted tokens cannot be restored (no assisted decoding)."""
        raise MsrnnError("an eviction cache cannot be cropped (no assisted decoding); use a DynamicCache for that")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence's slots ``repeats`` times (beam search / sampling)."""
        self._per_sequence(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences at ``indices``."""
        self._per_sequence(lambda t: t[indices])

    def _per_sequence(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``fn`` applied along the batch to every per-sequence tensor (in the chronological layout)."""
        if self.free is not None:
            self._to_naive()
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.slots is not None:
            self.slots = self.slots.map(fn)
        if self.counter is not None:
            self.counter = fn(self.counter)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the sequences for beam search."""
        self.batch_select_indices(beam_idx.to(self.device))

    def kept_positions(self) -> torch.Tensor:
        """Original positions of the tokens this layer holds, [B, G, S] (-1 = padding), in chronological order."""
        if self.free is not None:
            return self.slots.positions.gather(2, self._live_order())
        return self.slots.positions

    # Read-only views of the slot table, for callers that inspect a layer (tests, studies).
    @property
    def positions(self) -> torch.Tensor | None:
        return None if self.slots is None else self.slots.positions

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self.slots is None else self.slots.valid

    @property
    def acc(self) -> torch.Tensor | None:
        return None if self.slots is None else self.slots.acc


class KVEvictionCache(Cache):
    """A bounded KV cache: ``Cache(layers=[EvictionLayer, ...])``, usable wherever transformers takes a cache
    (``cache=`` from 5.24, ``past_key_values=`` before; :func:`msrnn.compat.cache_kwargs` picks the name).

    The model must use msrnn's attention function (:func:`msrnn.kv.prepare_model`) so layers receive scores.
    ``ref=True`` runs the exact prefill through its slow, readable twin (the same results; for tests).
    ``storage='fixed'`` decodes in place in a preallocated ``budget + 1`` slot buffer per layer once a layer is full
    (the same kept tokens as ``'naive'``; slots are then not in chronological order, and positions travel with
    them); ``'naive'`` rebuilds the kept slots at every step.
    """

    def __init__(self, num_layers: int, policy: Policy, prefill: str = "exact", positions: str = "original",
                 rotations: list[Rotation] | None = None, ref: bool = False, storage: str = "naive") -> None:
        check_options(policy, prefill, positions, storage)
        if positions == "rolling":
            if rotations is None:
                raise ConfigError("positions='rolling' re-rotates RoPE keys, but no per-layer rotation was given "
                                  "(msrnn.kv.make_cache finds it by verifying the model); use positions='original'")
            if len(rotations) != num_layers:
                raise ConfigError(f"{len(rotations)} rotations for {num_layers} layers")
        self.policy = policy
        per_layer = rotations if rotations is not None else [None] * num_layers
        super().__init__(layers=[EvictionLayer(policy, prefill, positions, rotation, ref, storage)
                                 for rotation in per_layer])

    def max_slots(self) -> int:
        """The most slots any layer holds now."""
        return max((layer.num_slots() for layer in self.layers), default=0)

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Original positions [B, G, slots] kept by layer ``layer_idx`` (-1 for padding)."""
        return self.layers[layer_idx].kept_positions()
