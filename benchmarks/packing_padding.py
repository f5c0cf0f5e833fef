"""What document packing costs a model that trains a row per document (BST, RMT): the padding.

Usage: python benchmarks/packing_padding.py [--data stdlib] [--lengths 256,512,2048] [--steps 200] [--json]

For each window length it draws the trainer's own batches (``LMBatches``, batch 8, a quarter self-repeating, seed 0)
and lays them out as :func:`msrnn.data.document_rows` does: the tokens the rows hold over the tokens of the packed
windows, and how many documents start inside a window. A model that passes the packing check (Llama, SUPRA) trains
on the packed windows and pays nothing.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--lengths", default="256,512,2048")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from msrnn.data import LMBatches, document_rows, token_stream
    from msrnn.data.corpus import training_specs
    from msrnn.train.pretrain import ensure_tokenizer

    tok = ensure_tokenizer(args.data, 4096)
    stream = token_stream(training_specs(args.data)[0], tok)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        batches = LMBatches(stream, length, 8, tok.eos_token_id, 0.25, seed=0)
        packed = laid = starts = 0
        for step in range(args.steps):
            batch = batches.batch(step)
            packed += batch["input_ids"].numel()
            laid += document_rows(batch, pad_id=0)["input_ids"].numel()
            starts += int((batch["position_ids"][:, 1:] == 0).sum())
        rows.append({"window": length, "starts_per_window": starts / (8 * args.steps), "rows_vs_packed": laid / packed})
    if args.json:
        print(json.dumps({"data": args.data, "documents": len(stream), "tokens": stream.num_tokens, "rows": rows}))
        return
    print(f"{args.data}: {len(stream):,} documents, {stream.num_tokens:,} tokens")
    print("| window | documents starting inside a window | tokens a row per document holds / packed |")
    print("|---:|---:|---:|")
    for r in rows:
        print(f"| {r['window']:,} | {r['starts_per_window']:.2f} | {r['rows_vs_packed']:.2f}x |")


if __name__ == "__main__":
    main()
