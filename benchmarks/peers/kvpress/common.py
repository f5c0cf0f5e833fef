"""What both sides of the kvpress comparison share: the model's shape and weights, the prompt, the clock, and how
kept tokens are identified. Imports torch and transformers only, since it runs in two environments (msrnn's, and
kvpress 0.5.5's own, which needs transformers < 5.3).

Kept tokens are identified by their keys: a prefill's keys are a function of the weights, the tokens and their
positions, so each key a compressed cache holds equals exactly one key of a full-cache run of the same prompt, and
its index there is the token's position. Neither library has to expose its bookkeeping for this.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# msrnn's ``small`` preset (4 layers, d = 256, 4 query / 2 KV heads, tied embeddings), with room for 16k positions.
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16384, rope_theta=10000.0, tie_word_embeddings=True)


def config() -> LlamaConfig:
    cfg = LlamaConfig(**SHAPE)
    cfg._attn_implementation = "sdpa"
    return cfg


def make_weights(path: Path, seed: int = 0) -> None:
    """Random weights for ``SHAPE`` (the tied head is stored once)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config())
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(path))


def load(path: Path) -> LlamaForCausalLM:
    """The model with the saved weights, fp32, eval mode; every tensor but the tied head must be in the file."""
    from safetensors.torch import load_file

    model = LlamaForCausalLM(config())
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"weights do not fit the shape: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def prompt(tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(seed))


def positions_of(kept: torch.Tensor, full: torch.Tensor) -> list[list[int]]:
    """Per KV head, the positions (in cache order) of the keys ``kept`` [1, H, k, D] within ``full`` [1, H, T, D]."""
    out = []
    for h in range(full.shape[1]):
        d = torch.cdist(kept[0, h].float(), full[0, h].float(), compute_mode="donot_use_mm_for_euclid_dist")  # [k, T]
        best = d.min(dim=1)
        if float(best.values.max()) > 1e-4:
            raise SystemExit("a kept key matches no key of the full run: the two runs did not read the same prompt")
        out.append(best.indices.tolist())
    return out


def timed(fn) -> float:
    """Seconds of one call (CPU here; a GPU run would synchronise around it)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(variants: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each variant over ``rounds`` rounds, one call of every variant per round, after one
    untimed warm-up call each (the machine's load drifts; interleaving spreads it over every variant)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def side_start(library: str):
    """What both sides start with: their arguments (run.py passes the same ones to each), the model on one thread,
    and the result's header naming the library and the versions it ran on."""
    from importlib.metadata import version

    args = side_args()
    result = {"library": f"{library} {version(library)}", "torch": torch.__version__,
              "transformers": version("transformers"), "lengths": {}}
    return args, load(args.weights), result


def side_args():
    """The arguments both sides take (run.py passes the same ones to each)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("weights", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sinks", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    return args


def write(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
