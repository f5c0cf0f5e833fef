"""The msrnn half of the comparison; runs in msrnn's environment.

    python msrnn_side.py WEIGHTS OUT.json --tokens 4096,8192 --budget 512 --steps 32 --rounds 3

The same outputs as ``kvpress_side.py``, through msrnn's public API: TOVA with ``keep_newest`` and one-shot prefill
(kvpress's TOVAPress definition), Window+4 (``sink``) for StreamingLLM, prefill in one chunk next to msrnn's own
full cache (one-shot and msrnn's default, exact), and decode under a hard budget (fixed storage, every step
evicts) next to the full cache. Kept positions are read off the keys, as on the kvpress side, and also from
msrnn's own bookkeeping (they must agree: a check of the method).
"""

from __future__ import annotations

import time

import torch
from common import interleaved, positions_of, prompt, side_start, write

from msrnn.kv import KVEvictionLM, make_policy
from msrnn.models import HFCausalLM
from msrnn.protocol import fork_state, prefill


def bounded(model, name: str, k: int, prefill_mode: str, **options) -> KVEvictionLM:
    return KVEvictionLM(model, make_policy(name, k, **options), prefill=prefill_mode, storage="fixed")


def kept(lm: KVEvictionLM, full_lm: HFCausalLM, ids: torch.Tensor) -> list[list[list[int]]]:
    with torch.inference_mode():
        _, state = prefill(lm, ids, ids.shape[1])
        _, full = prefill(full_lm, ids, ids.shape[1])
    out = []
    for i, layer in enumerate(state.cache.layers):
        by_keys = positions_of(layer.keys, full.cache.layers[i].keys)
        own = layer.kept_positions()[0]  # [G, k]
        if any(sorted(p) != sorted(own[min(h, own.shape[0] - 1)].tolist()) for h, p in enumerate(by_keys)):
            raise SystemExit(f"layer {i}: the keys held disagree with msrnn's own kept positions")
        out.append(by_keys)
    return out


def decode_seconds(lm, state, steps: int) -> float:
    tok = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for i in range(steps):
            tok.fill_(i % 4096)
            _, state = lm.forward_chunk(tok, state)
        return time.perf_counter() - t0


def streaming_reproduction(model, tokens: int, budget: int, sinks: int, steps: int) -> dict:
    """The positions msrnn's Window+sinks holds in layer 0 after a prompt and each decode step."""
    ids = prompt(tokens, seed=2)
    fed = torch.randint(0, 4096, (1, steps), generator=torch.Generator().manual_seed(3))
    lm = bounded(model, "sink", budget, "oneshot", sinks=sinks)
    held = []
    with torch.inference_mode():
        _, state = prefill(lm, ids, tokens)
        held.append(state.cache.layers[0].kept_positions()[0, 0].tolist())
        for i in range(steps):
            _, state = lm.forward_chunk(fed[:, i : i + 1], state)
            held.append(state.cache.layers[0].kept_positions()[0, 0].tolist())
    return {"tokens": tokens, "budget": budget, "sinks": sinks, "steps": steps, "held": held}


def main() -> None:
    args, model, result = side_start("msrnn")
    k = args.budget
    full_lm = HFCausalLM(model)
    for T in (int(t) for t in args.tokens.split(",")):
        ids = prompt(T)
        row: dict = {"kept": {"tova": kept(bounded(model, "tova", k, "oneshot", keep_newest=True), full_lm, ids),
                              "streaming_llm": kept(bounded(model, "sink", k, "oneshot", sinks=args.sinks),
                                                    full_lm, ids)}}
        lms = {"prefill full": full_lm, "prefill tova": bounded(model, "tova", k, "oneshot", keep_newest=True),
               "prefill tova exact": bounded(model, "tova", k, "exact", keep_newest=True)}
        secs = interleaved({name: (lambda lm=lm, ids=ids, T=T: prefill(lm, ids, T)) for name, lm in lms.items()},
                           args.rounds)
        with torch.inference_mode():
            states = {"decode full": (full_lm, prefill(full_lm, ids, T)[1]),
                      "decode tova hard budget": (lms["prefill tova"], prefill(lms["prefill tova"], ids, T)[1])}
        times: dict[str, list[float]] = {name: [] for name in states}
        for r in range(args.rounds + 1):  # interleaved, from a fresh copy of each prefilled state; round 0 warms up
            for name, (lm, state) in states.items():
                t = decode_seconds(lm, fork_state(state), args.steps)
                if r:
                    times[name].append(t)
        secs.update({name: sorted(t)[len(t) // 2] for name, t in times.items()})
        row["seconds"] = secs
        result["lengths"][str(T)] = row
    result["streaming_reproduction"] = streaming_reproduction(model, 256, 32, args.sinks, 40)
    write(args.out, result)


if __name__ == "__main__":
    main()
