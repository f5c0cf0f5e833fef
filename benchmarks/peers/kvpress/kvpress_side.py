"""The kvpress half of the comparison; runs in kvpress's own environment (requirements.txt here).

    python kvpress_side.py WEIGHTS OUT.json --tokens 4096,8192 --budget 512 --steps 32 --rounds 3

Writes, for each prompt length: the positions TOVAPress and StreamingLLMPress keep after a prefill compressed to
the budget (per layer and KV head), prefill and hard-budget decode times next to kvpress's own full cache, and the
StreamingLLM reproduction: the positions a bounded StreamingLLM (``DecodingPress`` over ``StreamingLLMPress``,
compressing at every step) holds while decoding, read off layer 0's keys.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch
from common import interleaved, positions_of, prompt, side_start, write
from kvpress import DecodingPress, PrefillDecodingPress, StreamingLLMPress, TOVAPress
from transformers import DynamicCache


def full_keys(model, ids: torch.Tensor) -> list[torch.Tensor]:
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    return [layer.keys for layer in cache.layers]


def pressed_cache(model, press, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.inference_mode(), press(model):
        model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    return cache


def kept(model, press, ids: torch.Tensor, full: list[torch.Tensor]) -> list[list[list[int]]]:
    cache = pressed_cache(model, press, ids)
    return [positions_of(layer.keys, f) for layer, f in zip(cache.layers, full, strict=True)]


def decode(model, cache, start: int, steps: int, press=None) -> float:
    """Seconds for ``steps`` single-token steps after a prompt of ``start`` tokens (positions given explicitly,
    as kvpress's pipeline does, since a compressed cache's length is no longer the position)."""
    tok = torch.zeros(1, 1, dtype=torch.long)
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        t0 = time.perf_counter()
        for i in range(steps):
            tok.fill_(i % 4096)
            model(input_ids=tok, past_key_values=cache, position_ids=torch.tensor([[start + i]]), logits_to_keep=1)
        return time.perf_counter() - t0


def streaming_reproduction(model, tokens: int, budget: int, sinks: int, steps: int) -> dict:
    """Positions a bounded StreamingLLM holds in layer 0 after a compressed prefill and each of ``steps`` decode
    steps (what StreamingLLM should hold: the ``sinks`` first positions and the newest ``budget - sinks``)."""
    ids = prompt(tokens, seed=2)
    fed = torch.randint(0, 4096, (1, steps), generator=torch.Generator().manual_seed(3))
    reference = full_keys(model, torch.cat([ids, fed], dim=1))[0]  # layer 0: a key depends on token and position
    press = PrefillDecodingPress(
        prefilling_press=StreamingLLMPress(compression_ratio=1 - budget / tokens, n_sink=sinks),
        decoding_press=DecodingPress(base_press=StreamingLLMPress(n_sink=sinks), compression_interval=1,
                                     target_size=budget, hidden_states_buffer_size=1))
    cache = DynamicCache()
    held = []
    with torch.inference_mode(), press(model):
        model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        held.append(positions_of(cache.layers[0].keys, reference)[0])
        for i in range(steps):
            model(input_ids=fed[:, i : i + 1], past_key_values=cache, position_ids=torch.tensor([[tokens + i]]),
                  logits_to_keep=1)
            held.append(positions_of(cache.layers[0].keys, reference)[0])
    return {"tokens": tokens, "budget": budget, "sinks": sinks, "steps": steps, "held": held}


def main() -> None:
    args, model, result = side_start("kvpress")
    k = args.budget
    for T in (int(t) for t in args.tokens.split(",")):
        ids = prompt(T)
        full = full_keys(model, ids)
        ratio = 1 - k / T
        row: dict = {"kept": {"tova": kept(model, TOVAPress(compression_ratio=ratio), ids, full),
                              "streaming_llm": kept(model, StreamingLLMPress(compression_ratio=ratio,
                                                                             n_sink=args.sinks), ids, full)}}
        full_cache = pressed_cache(model, lambda m: contextlib.nullcontext(), ids)
        tova_cache = pressed_cache(model, TOVAPress(compression_ratio=ratio), ids)
        hard = PrefillDecodingPress(
            prefilling_press=TOVAPress(compression_ratio=ratio),
            decoding_press=DecodingPress(base_press=TOVAPress(), compression_interval=1, target_size=k,
                                         hidden_states_buffer_size=1))

        def prefill(press=None, ids=ids):
            cache = DynamicCache()
            ctx = press(model) if press is not None else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                model(input_ids=ids, past_key_values=cache, logits_to_keep=1)

        secs = interleaved({
            "prefill full": lambda: prefill(),
            "prefill tova": lambda ratio=ratio: prefill(TOVAPress(compression_ratio=ratio)),
        }, args.rounds)
        dec = interleaved_decode(model, {"decode full": (full_cache, None),
                                         "decode tova hard budget": (tova_cache, hard)}, T, args.steps, args.rounds)
        row["seconds"] = {**secs, **dec}
        result["lengths"][str(T)] = row
    result["streaming_reproduction"] = streaming_reproduction(model, 256, 32, args.sinks, 40)
    write(args.out, result)


def interleaved_decode(model, variants: dict, start: int, steps: int, rounds: int) -> dict[str, float]:
    """Median decode seconds per variant over interleaved rounds, each from a fresh copy of its prefilled cache (the
    copy is not timed), after one untimed warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, (cache, press) in variants.items():
            t = decode(model, copy.deepcopy(cache), start, steps, press)
            if r:
                times[name].append(t)
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
