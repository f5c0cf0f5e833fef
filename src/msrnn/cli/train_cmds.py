"""``msrnn tokenizer`` and ``msrnn pretrain``."""

from __future__ import annotations

import argparse
from pathlib import Path

from msrnn.cli.common import add_output_flags, emit, positive_int
from msrnn.cli.training import add_training_flags, check_out, summary, train_config
from msrnn.errors import ConfigError


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus",
                       description="Train a byte-level BPE on the train split of --data and save it to --out.")
    p.add_argument("--data", default="stdlib", help="corpus spec: stdlib, a path, or hf:NAME (default stdlib)")
    p.add_argument("--vocab-size", type=positive_int, default=4096)
    p.add_argument("--out", required=True, help="folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    add_output_flags(p)
    p.set_defaults(func=run_tokenizer)


def run_tokenizer(args: argparse.Namespace) -> int:
    from msrnn.data import load_documents, save_tokenizer, train_bpe
    from msrnn.data.corpus import parse_data_spec
    from msrnn.ui import err_console

    spec = parse_data_spec(args.data)
    if spec.split == "all" and spec.source == "stdlib":
        spec = spec.__class__(spec.source, spec.name, "train")
    if Path(args.out).exists() and not args.overwrite:
        raise ConfigError(f"{args.out} already exists; choose another --out or pass --overwrite")
    held = [name for name in ("config.json", "msrnn.json", "checkpoints") if (Path(args.out) / name).exists()]
    if held:  # --overwrite replaces a tokenizer folder, never a model or a run
        raise ConfigError(f"{args.out} holds a model or a run ({', '.join(held)}), not just a tokenizer; "
                          "--overwrite would delete it: choose another --out")
    docs = load_documents(spec)
    with err_console.status(f"training a {args.vocab_size}-token BPE on {len(docs)} documents"):
        tok = train_bpe((d.text for d in docs), vocab_size=args.vocab_size)
        save_tokenizer(tok, args.out, overwrite=args.overwrite)
    sample = docs[0].text[:20000]
    ratio = len(sample.encode()) / max(1, len(tok(sample)["input_ids"]))
    res = {"out": str(args.out), "vocab_size": len(tok), "documents": len(docs), "bytes_per_token": ratio}
    return emit(args, "tokenizer", res)


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a Llama-architecture base model from a preset",
                       description="Train a preset Llama model (tiny/small/base) on --data and write a model "
                                   "directory (weights, tokenizer, msrnn.json) to --out.")
    p.add_argument("--preset", default="small", help="tiny | small | base (default small)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train and cache a BPE)")
    p.add_argument("--vocab-size", type=positive_int, default=None,
                   help="tokens of the BPE trained when no --tokenizer is given (default 4096)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    add_training_flags(p, max_steps=1000, lr=2e-3, warmup_steps=50, eval_every=100, save_every=200)
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from msrnn.train.pretrain import PretrainConfig, pretrain

    if args.tokenizer and args.vocab_size is not None:  # the tokenizer's own size wins: the flag would be ignored
        raise ConfigError("--vocab-size sizes the BPE msrnn trains, but --tokenizer brings its own; drop one")
    out = check_out(args)
    cfg = PretrainConfig(preset=args.preset, data=args.data, tokenizer=args.tokenizer,
                         vocab_size=args.vocab_size or 4096,
                         seq_len=args.seq_len, batch_size=args.batch_size, repeat_fraction=args.repeat_fraction,
                         attn_implementation=args.attn, packing=args.packing)
    trainer, result = pretrain(cfg, train_config(args), out, resume=args.resume, progress=not args.quiet)
    return emit(args, "pretrain", summary(out, trainer, result))
