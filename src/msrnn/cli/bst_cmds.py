"""``msrnn train bst``: train a Block-State Transformer (or its SLIDE / full-attention baselines), from scratch or
started from a pretrained Llama-style model (``--from``)."""

from __future__ import annotations

import argparse

from msrnn.cli.common import emit, int_list, positive_int
from msrnn.cli.training import add_training_flags, check_out, summary, train_config


def add_train_bst(ts: argparse._SubParsersAction) -> None:
    p = ts.add_parser("bst", help="train a Block-State Transformer (sh|mh|mf) or a SLIDE / full baseline",
                      description="Build a BST language model at the size of --preset (hidden size, layers, heads, "
                                  "FFN) and train it on --data with the shared trainer. The SSM sublayer sits at "
                                  "--ssm-layers; the other layers attend within their block of --block-size tokens.")
    p.add_argument("--from", dest="source", default=None,
                   help="start from this pretrained Llama/Mistral directory (its size, tokenizer and weights; the "
                        "SSM is new) instead of a --preset model from scratch")
    p.add_argument("--variant", default="sh", help="sh | mh | mf | slide | full (default sh)")
    p.add_argument("--kernel", default="s4", help="s4 (structured, any length) | unstruct (explicit taps)")
    p.add_argument("--preset", default=None, help="size preset: tiny | small | base (default small; not with --from)")
    p.add_argument("--block-size", type=positive_int, default=None, help="W (default seq-len / 8)")
    p.add_argument("--state-size", type=int, default=16, help="S4D state size N, even (default 16)")
    p.add_argument("--mf-states", type=positive_int, default=8, help="MF: number of filters/context states")
    p.add_argument("--ssm-layers", default=None, help="comma-separated layer indices (default: the middle one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the cached stdlib BPE)")
    p.add_argument("--vocab-size", type=positive_int, default=None, help="BPE size without --tokenizer (default 4096)")
    add_training_flags(p, max_steps=400, lr=2e-3, warmup_steps=30, eval_every=100, save_every=100)
    p.set_defaults(func=run_train_bst)


def run_train_bst(args: argparse.Namespace) -> int:
    import torch

    from msrnn.bst import BSTConfig, BSTForCausalLM
    from msrnn.errors import ConfigError
    from msrnn.train.pretrain import PretrainConfig, ensure_tokenizer, train_lm

    ignored = [flag for flag, value in (("--preset", args.preset), ("--vocab-size", args.vocab_size),
                                        ("--tokenizer", args.tokenizer)) if value is not None]
    if args.source and ignored:  # the source model's size and tokenizer win: these would be ignored and recorded
        raise ConfigError(f"{', '.join(ignored)} size a model from scratch, but --from {args.source} brings its own; "
                          "drop them")
    if args.tokenizer and args.vocab_size is not None:
        raise ConfigError("--vocab-size sizes the BPE msrnn trains, but --tokenizer brings its own; drop one")
    out = check_out(args)
    try:
        layers = [int(x) for x in args.ssm_layers.split(",")] if args.ssm_layers else None
    except ValueError:
        raise ConfigError("--ssm-layers takes comma-separated layer indices, e.g. 1,3") from None
    W = args.block_size or max(1, args.seq_len // 8)
    shape = dict(block_size=W, variant=args.variant, kernel=args.kernel, state_size=args.state_size,
                 mf_states=args.mf_states, ssm_layers=layers, filter_length=args.seq_len)
    if args.source:
        from msrnn.bst import from_llama
        from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for

        tokenizer = load_tokenizer_for(args.source)
        model = from_llama(load_hf_causal_lm(args.source), seed=args.seed, **shape).train()
        cfg = model.config  # on the CPU: the trainer's Accelerator places it, each rank on its own device
    else:
        tokenizer = ensure_tokenizer(args.data, args.vocab_size or 4096, args.tokenizer)
        cfg = BSTConfig.from_preset(args.preset or "small", len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, **shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = BSTForCausalLM(cfg)  # on the CPU: the trainer's Accelerator places it
    data = PretrainConfig(preset=None if args.source else args.preset or "small", data=args.data,
                          seq_len=args.seq_len, batch_size=args.batch_size, repeat_fraction=args.repeat_fraction,
                          vocab_size=len(tokenizer), tokenizer=args.tokenizer, packing=args.packing)
    meta = {"family": "bst", "name": cfg.name, "variant": args.variant, "kernel": args.kernel,
            "block_size": W, "train_length": args.seq_len, "started_from": args.source}
    trainer, result = train_lm(model, tokenizer, data, train_config(args), out, meta, resume=args.resume,
                               progress=not args.quiet)
    res = summary(out, trainer, result)
    res.update({"model": cfg.name, "params": sum(p.numel() for p in model.parameters()), "block_size": W})
    return emit(args, "train bst", res)


def add_bench_bst(bs: argparse._SubParsersAction) -> None:
    from msrnn.cli.common import add_output_flags

    p = bs.add_parser("bst", help="S4D by FFT vs recurrent scan; BST layer vs full attention vs block-sequential")
    p.add_argument("--ssm-lengths", default="4096,16384,65536")
    p.add_argument("--layer-lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--channels", type=positive_int, default=256, help="SSM channels (= model width)")
    p.add_argument("--block-size", type=positive_int, default=128)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS-versus-L subprocess runs")
    p.add_argument("--out", default=None, help="write results.json here")
    add_output_flags(p)
    p.set_defaults(func=run_bench_bst)


def run_bench_bst(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from msrnn.bench.bst import bench_layers, bench_memory, bench_ssm
    from msrnn.bench.rows import Column, dash, render
    from msrnn.io import write_json
    from msrnn.provenance import stamped
    from msrnn.ui import err_console, out_console, print_json

    ssm_lengths = int_list(args.ssm_lengths, "--ssm-lengths")
    layer_lengths = int_list(args.layer_lengths, "--layer-lengths")
    ragged = [L for L in layer_lengths if L % args.block_size]
    if ragged:  # the block-sequential timing walks whole blocks: a ragged tail would time another length
        from msrnn.errors import ConfigError

        raise ConfigError(f"--block-size {args.block_size} does not divide --layer-lengths "
                          f"{', '.join(map(str, ragged))}; use lengths that are multiples of the block size")
    with err_console.status("timing the S4D layer: FFT vs recurrent scan"):
        ssm = bench_ssm(ssm_lengths, channels=args.channels, rounds=args.rounds)
    with err_console.status("timing one layer: BST vs full attention vs block-sequential"):
        layers = bench_layers(layer_lengths, d=args.channels, W=args.block_size, rounds=args.rounds)
    memory = None
    if not args.no_memory and sys.platform.startswith("linux"):
        with err_console.status("peak RSS per layer forward, one fresh process per length"):
            memory = bench_memory(layer_lengths, d=args.channels, W=args.block_size)
    result = {"ssm": ssm, "layers": layers, "memory": memory, "channels": args.channels, "block": args.block_size}
    if args.out:
        write_json(Path(args.out) / "results.json", stamped(result))
    if args.json:
        print_json(result)
        return 0
    # The slow forms are timed only up to a length: "-" above it.
    out_console.print(render(f"S4D, 1 x {args.channels} channels, N=16", ssm,
                             [Column("L", lambda r: r.L), Column("fft ms", lambda r: r.fft_ms),
                              Column("scan ms", lambda r: dash(r.scan_ms)),
                              Column("scan / fft", lambda r: dash(r.scan_over_fft))]))
    out_console.print(render(f"one layer, d={args.channels}, W={args.block_size}", layers,
                             [Column("L", lambda r: r.L), Column("bst ms", lambda r: r.bst_ms),
                              Column("full attn ms", lambda r: r.full_ms),
                              Column("block-sequential ms", lambda r: dash(r.sequential_ms)),
                              Column("full / bst", lambda r: r.full_over_bst),
                              Column("sequential / bst", lambda r: dash(r.sequential_over_bst))]))
    if memory:
        out_console.print(render("peak RSS growth of one forward (MiB)", memory,
                                 [Column("L", lambda r: r.L), Column("bst MiB", lambda r: r.bst_mib),
                                  Column("full attn MiB", lambda r: r.full_mib)]))
    return 0
