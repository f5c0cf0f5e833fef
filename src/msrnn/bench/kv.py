"""KV eviction speed, measured side by side: decode versus context, and prefill cost per prefill mode.

Decode (:func:`run_kv_bench`): for each context length every variant is prefilled to that length, then
single-token decode steps are timed. Bounded caches prefill with ``oneshot`` eviction (the state after prefill is
what decoding sees; the prefill mode does not change decode cost).

Prefill (:func:`run_kv_prefill_bench`): the same prompt fed in fixed chunks from an empty state through the full
cache and through bounded caches with each prefill mode (``exact`` is the token-by-token protocol, ``oneshot``
TOVA's one eviction per chunk), optionally also through the exact prefill's slow readable twin.

Throughput (:func:`run_kv_throughput_bench`): at one KV memory budget, the largest batch of full caches and the
largest batch of bounded caches that fit, each prefilled to the same context, then batched decode steps timed:
generated tokens/s of the whole batch, the quantity behind TOVA's "4.8x higher throughput".

Variants are measured in interleaved rounds and the median kept, so the ratios compare like with like on a
noisy machine.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from msrnn.bench.rows import Row
from msrnn.bench.timing import DECODE_WARMUP, timed, timed_decode
from msrnn.errors import ConfigError, MsrnnError
from msrnn.kv.cache import check_storage, parse_prefill
from msrnn.protocol import prefill


@dataclass
class KVBenchConfig:
    """Contexts, budget, decode steps and rounds of ``bench kv``."""

    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    budget: int = 512
    steps: int = 32
    rounds: int = 3
    prefill_chunk: int = 1024
    storage: str = "fixed"  # of the bounded caches; "fixed" also times TOVA on the naive twin ("tova@k naive")
    compile: bool = False  # also time TOVA with its in-place decode step compiled ("tova@k compiled")

    def __post_init__(self) -> None:
        if not self.contexts or min(self.contexts) < 2:
            raise ConfigError("contexts must be >= 2 tokens")
        if self.budget < 1 or self.steps < 1 or self.rounds < 1:
            raise ConfigError("budget, steps and rounds must be >= 1")
        short = [c for c in self.contexts if c <= self.budget]
        if short:  # nothing is evicted there: a "speed-up" would compare two full caches
            raise ConfigError(f"contexts {', '.join(map(str, short))} are within the budget of {self.budget} slots, "
                              "where nothing is evicted; use contexts longer than --budget")
        check_storage(self.storage)
        if self.compile and self.storage != "fixed":
            raise ConfigError("compile times the in-place decode step of fixed storage; drop --storage naive")


# The variants of ``bench kv`` (decode). A bounded one is named ``<policy>@<budget>[ <form>]`` in results.
FULL, PLAIN, WINDOW, TOVA, TOVA_NAIVE, TOVA_COMPILED = "full", "plain", "window", "tova", "tova naive", "tova compiled"


@dataclass
class DecodeRow(Row):
    """One context of ``bench kv``: each variant's decode tokens/s, the state it holds, and the memory-bound limit
    of its step (filled in once the run's best copy bandwidth is known)."""

    context: int
    budget: int
    tok_s: dict[str, float]  # variant -> median decode tokens/s
    state_bytes: dict[str, int]  # variant -> bytes held after prefill
    limit_tok_s: dict[str, float] = field(default_factory=dict)  # variant -> bandwidth / (weights + state bytes)

    def label(self, variant: str) -> str:
        """The variant's name in results: ``full``, or ``<policy>@<budget>`` and its form (``tova@512 naive``)."""
        if variant == FULL:
            return variant
        policy, _, form = variant.partition(" ")
        return f"{policy}@{self.budget}" + (f" {form}" if form else "")

    def speed(self, a: str, b: str) -> float | None:
        """Decode speed of variant ``a`` over ``b`` (None when either was not run)."""
        return self.tok_s[a] / self.tok_s[b] if a in self.tok_s and b in self.tok_s else None

    @property
    def tova_full(self) -> float:
        return self.speed(TOVA, FULL)

    @property
    def ceiling(self) -> float:
        """What a free eviction would give: a plain cache of ``budget`` tokens over the full cache."""
        return self.speed(PLAIN, FULL)

    @property
    def tova_of_ceiling(self) -> float:
        """TOVA's speed-up as a share of the ceiling (= tova / plain)."""
        return self.tova_full / self.ceiling

    def limit_share(self, variant: str) -> float:
        """The variant's measured speed as a share of its memory-bound limit."""
        return self.tok_s[variant] / self.limit_tok_s[variant]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"context": self.context}
        for v in self.tok_s:
            out[f"{self.label(v)} tok/s"] = self.tok_s[v]
            out[f"{self.label(v)} bytes"] = self.state_bytes[v]
        out.update({"tova/full speed": self.tova_full, "tova overhead vs window": self.speed(WINDOW, TOVA) - 1,
                    "tova/window": self.speed(TOVA, WINDOW), "tova/plain": self.speed(TOVA, PLAIN),
                    "ceiling": self.ceiling, "tova/full of ceiling": self.tova_of_ceiling})
        if TOVA_NAIVE in self.tok_s:
            out["tova fixed/naive"] = self.speed(TOVA, TOVA_NAIVE)
        if TOVA_COMPILED in self.tok_s:
            out["tova compiled/eager"] = self.speed(TOVA_COMPILED, TOVA)
            out["tova compiled/plain"] = self.speed(TOVA_COMPILED, PLAIN)
        for v, limit in self.limit_tok_s.items():
            out[f"{self.label(v)} limit tok/s"] = limit
        return out


@torch.inference_mode()
def _prefill(lm, ctx: int, vocab: int, chunk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, ctx), generator=g)
    return prefill(lm, ids, chunk)[1]


def copy_bandwidth(device: torch.device | str, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s of a plain tensor copy (bytes read + bytes written, best of ``repeats``): the
    physical limit a memory-bound decode step is held against."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy faults the pages in
    best = min(timed(lambda: dst.copy_(src), src.device) for _ in range(repeats))
    return 2 * src.nbytes / best


def weight_bytes(model: Any) -> int:
    """Bytes of every parameter (tied tensors once): what one decode step reads at least once."""
    return sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())


def run_kv_bench(model: Any, cfg: KVBenchConfig, progress: Any = None) -> dict[str, Any]:
    """Decode tokens/s and KV bytes, full cache vs window and TOVA, interleaved rounds.

    Next to them, in the same rounds: a plain full cache holding only ``budget`` tokens (what a bounded cache
    would cost with no eviction bookkeeping) and the physical limit of a memory-bound step, ``bandwidth / (weight
    bytes + KV bytes)`` with the bandwidth of a tensor copy measured in the same run. The ceiling of bounded vs
    full at a context is ``plain@budget / full`` tok/s: what a free eviction would give."""
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import HFCausalLM

    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    full = HFCausalLM(model)
    b = cfg.budget
    bounded = {p: apply_kv(full, KVSettings(p, b, prefill="oneshot", storage=cfg.storage)) for p in (WINDOW, TOVA)}
    if cfg.storage == "fixed":
        bounded[TOVA_NAIVE] = apply_kv(full, KVSettings("tova", b, prefill="oneshot"))
    if cfg.compile:  # compiled during the first round's untimed warm-up steps
        bounded[TOVA_COMPILED] = apply_kv(full, KVSettings("tova", b, prefill="oneshot", storage="fixed", compile=True))
    plain = _prefill(full, b, vocab, cfg.prefill_chunk, seed=1)
    weights = weight_bytes(model)
    bandwidth = [copy_bandwidth(device)]
    rows = []
    for ctx in cfg.contexts:
        variants = {FULL: full, PLAIN: full, **bounded}
        states = {name: _prefill(lm, ctx, vocab, cfg.prefill_chunk, seed=ctx) for name, lm in variants.items()
                  if name != PLAIN}
        states[PLAIN] = copy.deepcopy(plain)  # the same `budget` tokens at every context
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(cfg.rounds):
            for name, lm in variants.items():
                # Decoding grows a full cache by `steps` (+2 warm-up) tokens per round: small next to `ctx`.
                times[name].append(timed_decode(lm, states[name], cfg.steps, vocab)[0] / cfg.steps)
        bandwidth.append(copy_bandwidth(device))
        row = DecodeRow(ctx, b, {name: 1.0 / statistics.median(times[name]) for name in variants},
                        {name: lm.state_nbytes(states[name]) for name, lm in variants.items()})
        rows.append(row)
        if progress:
            progress(row)
        del states
    for row in rows:  # the best copy of the run: the bandwidth the machine showed it can reach
        row.limit_tok_s = {name: max(bandwidth) / (weights + row.state_bytes[name]) for name in variants}
    # A compiled step that torch.compile gave up on ran eagerly: its figures are eager ones, and the result says so.
    fell_back = bool(cfg.compile and bounded[TOVA_COMPILED].compile_fell_back)
    return {"budget": b, "steps": cfg.steps, "rounds": cfg.rounds, "storage": cfg.storage, "compile": cfg.compile,
            "compile_fell_back_to_eager": fell_back, "rows": rows,
            "weight bytes": weights,
            "copy bandwidth GB/s": max(bandwidth) / 1e9, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}


@dataclass
class KVPrefillBenchConfig:
    """Prompt length, chunk, budget, policies and rounds of ``bench kv --mode prefill``."""

    tokens: int = 8192
    chunk: int = 512
    budget: int = 512
    policies: list[str] = field(default_factory=lambda: ["tova", "h2o", "window"])
    modes: list[str] = field(default_factory=lambda: ["exact", "chunked:64", "oneshot"])
    rounds: int = 3
    ref: bool = False  # also time the exact prefill's readable twin (slow: one query at a time)

    def __post_init__(self) -> None:
        if not self.modes:
            raise ConfigError("give at least one prefill mode, e.g. --modes exact,oneshot")
        for mode in self.modes:
            parse_prefill(mode)
        if self.tokens < 2 or self.chunk < 1 or self.budget < 1 or self.rounds < 1:
            raise ConfigError("tokens must be >= 2 and chunk, budget and rounds >= 1")
        if not self.policies:
            raise ConfigError("give at least one policy, e.g. --policies tova")
        if self.budget >= self.tokens:
            raise ConfigError(f"budget ({self.budget}) must be below the prompt length ({self.tokens}), or nothing "
                              "is evicted; raise --tokens or lower --budget")


@torch.inference_mode()
def _prefill_time(lm, ids: torch.Tensor, chunk: int) -> float:
    return timed(lambda: prefill(lm, ids, chunk), lm.device)


def run_kv_prefill_bench(model: Any, cfg: KVPrefillBenchConfig, progress: Any = None) -> dict[str, Any]:
    """Prefill tokens/s of the full cache and of each policy under each prefill mode, interleaved rounds."""
    from msrnn.kv import KVEvictionLM, KVSettings, apply_kv
    from msrnn.models import HFCausalLM

    full = HFCausalLM(model)
    variants: dict[str, Any] = {FULL: full}
    for p in cfg.policies:
        for mode in cfg.modes:
            variants[f"{p}@{cfg.budget} {mode}"] = apply_kv(full, KVSettings(p, cfg.budget, prefill=mode))
        if cfg.ref:
            variants[f"{p}@{cfg.budget} exact (reference twin)"] = KVEvictionLM(
                model, KVSettings(p, cfg.budget).make_policy(), ref=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, cfg.tokens), generator=g)
    _prefill_time(full, ids[:, : min(cfg.tokens, 2 * cfg.chunk)], cfg.chunk)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(cfg.rounds):
        for name, lm in variants.items():
            if "reference" in name and r > 0:
                continue  # the twin is ~10x slower; one round bounds the run time and is enough for its ratio
            times[name].append(_prefill_time(lm, ids, cfg.chunk))
            if progress:
                progress(name, cfg.tokens / times[name][-1])
    full_tps = cfg.tokens / statistics.median(times[FULL])
    rows = [PrefillRow(name, cfg.tokens / statistics.median(ts), full_tps, len(ts)) for name, ts in times.items()]
    return {"tokens": cfg.tokens, "chunk": cfg.chunk, "budget": cfg.budget, "rounds": cfg.rounds, "rows": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


@dataclass
class PrefillRow(Row):
    """One variant of ``bench kv-prefill``: prompt tokens/s (median of its rounds) and its speed over the full
    cache's."""

    variant: str
    tok_s: float
    full_tok_s: float
    rounds: int

    @property
    def vs_full(self) -> float:
        return self.tok_s / self.full_tok_s

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "tok/s": self.tok_s, "vs full": self.vs_full, "rounds": self.rounds}


@dataclass
class ThroughputRow(Row):
    """One side of ``bench kv --throughput``: the batch that fits the KV memory budget and its decode speed."""

    variant: str
    batch: int
    capped: bool  # --max-batch stopped a larger batch
    peak_bytes_per_sequence: int
    last_step_bytes: int  # the whole batch's KV bytes at its last step, measured
    seconds: float  # median time of the decode steps
    steps: int

    @property
    def peak_bytes(self) -> int:
        return self.batch * self.peak_bytes_per_sequence

    @property
    def tok_s_per_sequence(self) -> float:
        return self.steps / self.seconds

    @property
    def tok_s(self) -> float:
        return self.batch * self.tok_s_per_sequence

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "batch": self.batch, "capped": self.capped,
                "peak KV bytes per sequence": self.peak_bytes_per_sequence, "peak KV bytes": self.peak_bytes,
                "KV bytes at the last step": self.last_step_bytes, "tok/s per sequence": self.tok_s_per_sequence,
                "tok/s": self.tok_s}


@dataclass
class KVThroughputBenchConfig:
    """A KV memory budget, a context, a bounded budget and decode steps of ``bench kv --throughput``.

    ``memory_bytes`` None sizes the budget for ``full_batch`` full-cache sequences, so the full cache's batch is
    exactly that and the bounded cache's is whatever fits in the same bytes."""

    context: int = 4096
    budget: int = 512
    policy: str = "tova"
    steps: int = 32
    rounds: int = 3
    memory_bytes: int | None = None
    full_batch: int = 4
    max_batch: int = 64
    prefill_chunk: int = 1024  # full cache; bounded caches prefill in budget // 8 chunks (see the peak below)
    storage: str = "fixed"  # the bounded cache's (decoding holds budget + 1 slots either way)

    def __post_init__(self) -> None:
        check_storage(self.storage)
        if min(self.context, self.budget, self.steps, self.rounds, self.full_batch, self.max_batch) < 1:
            raise ConfigError("context, budget, steps, rounds, full batch and max batch must be >= 1")
        if self.budget >= self.context:
            raise ConfigError(f"budget ({self.budget}) must be below the context ({self.context}), or the bounded "
                              "cache holds as much as the full one; raise --contexts or lower --budget")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise ConfigError("the KV memory budget must be > 0 bytes")

    @property
    def bounded_chunk(self) -> int:
        """Prefill chunk of the bounded cache: small, so its in-forward peak (budget + chunk slots) stays close
        to the budget."""
        return max(1, self.budget // 8)


@torch.inference_mode()
def run_kv_throughput_bench(model: Any, cfg: KVThroughputBenchConfig, progress: Any = None) -> dict[str, Any]:
    """Generated tokens/s at a fixed KV memory budget: the largest batch of full caches against the largest batch
    of bounded caches that fit in the same bytes (TOVA's throughput claim: 4.8x at 1/8 of the cache).

    Memory is counted as KV slots held at the peak of the run, bookkeeping included: a full-cache sequence holds
    ``context + warm-up + steps`` slots at its last step; a bounded one holds ``budget + chunk`` slots inside a
    prefill forward (``budget + 1`` while decoding). Allocator transients (the concatenation copy of a layer,
    activations) are not counted, for either. Each variant's peak is measured on one sequence first, and the
    batch's state after the run is checked against the budget."""
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import HFCausalLM

    vocab = model.config.vocab_size
    full = HFCausalLM(model)
    name = f"{cfg.policy}@{cfg.budget}"
    settings = KVSettings(cfg.policy, cfg.budget, prefill="oneshot", storage=cfg.storage)
    bounded = apply_kv(full, settings)
    g = torch.Generator().manual_seed(0)
    probe_ids = torch.randint(0, vocab, (1, cfg.budget + cfg.bounded_chunk), generator=g)
    held = cfg.context + DECODE_WARMUP + cfg.steps  # slots a full-cache sequence holds at its last decode step
    per_token = full.state_nbytes(prefill(full, probe_ids, cfg.prefill_chunk)[1]) / probe_ids.shape[1]
    # Bytes of one kept slot, from the chronological layout (exactly `budget` slots after a chunked prefill)...
    naive = apply_kv(full, replace(settings, storage="naive"))
    per_slot = naive.state_nbytes(prefill(naive, probe_ids, max(2, cfg.bounded_chunk))[1]) / cfg.budget
    # ... and what the cache really holds while decoding (budget + 1 slots in place for fixed storage).
    probe = prefill(bounded, probe_ids, cfg.bounded_chunk)[1]
    decode_bytes = bounded.state_nbytes(bounded.forward_chunk(probe_ids[:, :1], probe)[1])
    peak = {FULL: int(per_token * held),
            name: max(int(per_slot * (cfg.budget + cfg.bounded_chunk)), decode_bytes)}
    memory = cfg.memory_bytes if cfg.memory_bytes is not None else cfg.full_batch * peak[FULL]
    batch = {k: min(cfg.max_batch, memory // v) for k, v in peak.items()}
    if batch[FULL] < 1:
        raise ConfigError(f"one full-cache sequence of {cfg.context} tokens needs {peak['full']:,} KV bytes, more "
                          f"than the {memory:,}-byte budget; raise --memory-mib or lower --contexts")
    variants = {FULL: (full, cfg.prefill_chunk), name: (bounded, cfg.bounded_chunk)}
    states = {}
    for k, (lm, chunk) in variants.items():
        ids = torch.randint(0, vocab, (batch[k], cfg.context), generator=g)
        states[k] = prefill(lm, ids, chunk)[1]
        if progress:
            progress(f"prefilled {k}: batch {batch[k]} x {cfg.context} tokens")
    times: dict[str, list[float]] = {k: [] for k in variants}
    last_bytes: dict[str, int] = {}
    for _ in range(cfg.rounds):
        for k, (lm, _chunk) in variants.items():
            # Every round decodes from a copy of the same prefilled state, so the peak stays known.
            t, end = timed_decode(lm, copy.deepcopy(states[k]), cfg.steps, vocab)
            times[k].append(t)
            last_bytes[k] = lm.state_nbytes(end)
    rows = [ThroughputRow(k, batch[k], batch[k] == cfg.max_batch and memory // peak[k] > cfg.max_batch, peak[k],
                          last_bytes[k], statistics.median(times[k]), cfg.steps) for k in variants]
    # The batch's real state at its last step, measured, must be what the sizing assumed (the full cache is at its
    # peak then; a bounded one holds its decode-time slots).
    per_sequence_at_end = {FULL: peak[FULL], name: decode_bytes}
    for r in rows:
        assumed = r.batch * per_sequence_at_end[r.variant]
        if r.last_step_bytes != assumed or r.peak_bytes > memory:
            raise MsrnnError(f"{r.variant}: the batch holds {r.last_step_bytes:,} KV bytes where the sizing assumed "
                             f"{assumed:,} within {memory:,} (a bug in the sizing; please report it)")
    return {"context": cfg.context, "budget": cfg.budget, "policy": cfg.policy, "steps": cfg.steps,
            "rounds": cfg.rounds, "storage": cfg.storage, "memory bytes": memory,
            "cache fraction": cfg.budget / cfg.context,
            "throughput ratio": rows[1].tok_s / rows[0].tok_s, "rows": rows,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
