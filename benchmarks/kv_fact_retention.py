"""Which memory-task facts does each KV policy still hold when the question arrives?

Streams task samples through a KV-evicting model the way ``msrnn compare`` does (128-token chunks, its prefill
mode ``msrnn.compare.KV_PREFILL``: exact) up to the question, then reports the share of the fact tokens' positions
still in the cache (averaged over layers and KV heads) and the accuracy on the same samples.

    python benchmarks/kv_fact_retention.py MODEL_DIR --slots h2o=62,tova=63,window=63 --segments 16 --samples 20
"""

from __future__ import annotations

import argparse
import json
import random

import torch


def main() -> None:
    from msrnn.compare import KV_PREFILL
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import load_lm
    from msrnn.tasks import TaskGenerator
    from msrnn.tasks.noise import noise_sentences

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--task", default="memorize")
    p.add_argument("--slots", default="h2o=62,tova=63,window=63", help="policy=slots, comma-separated")
    p.add_argument("--segments", type=int, default=16)
    p.add_argument("--segment-length", type=int, default=128)
    p.add_argument("--samples", type=int, default=20)
    args = p.parse_args()
    base = load_lm(args.model)
    gen = TaskGenerator(args.task, base.tokenizer, noise_sentences("stdlib", "test"))
    samples = gen.batch([args.segments * args.segment_length] * args.samples, random.Random(0))
    label_ids = torch.tensor(gen.label_token_ids())
    rows = []
    for spec in args.slots.split(","):
        name, slots = spec.split("=")
        lm = apply_kv(base, KVSettings(name, int(slots), prefill=KV_PREFILL))
        kept_share, correct = [], 0
        with torch.inference_mode():
            for s in samples:
                ids = torch.tensor(s.input_ids)[None]
                state, logits = lm.init_state(1), None
                for i in range(0, s.question_start, args.segment_length):  # the stream before the question
                    _, state = lm.forward_chunk(ids[:, i : min(i + args.segment_length, s.question_start)], state)
                facts = {p for a, b in s.fact_spans for p in range(a, b)}
                shares = []
                for layer in state.cache.layers:
                    for held in layer.kept_positions()[0]:  # [G, S] -> one KV head's kept positions
                        shares.append(len(facts & set(held[held >= 0].tolist())) / len(facts))
                kept_share.append(sum(shares) / len(shares))
                logits, state = lm.forward_chunk(ids[:, s.question_start :], state)
                correct += int(logits[0, -1, label_ids].argmax() == s.label)
        rows.append({"policy": name, "slots": int(slots), "fact_tokens_kept": sum(kept_share) / len(kept_share),
                     "accuracy": correct / len(samples)})
    print(json.dumps({"model": args.model, "segments": args.segments, "samples": args.samples, "rows": rows},
                     indent=1))


if __name__ == "__main__":
    main()
