"""``msrnn convert supra`` and ``msrnn train supra``."""

from __future__ import annotations

import argparse
from pathlib import Path

from msrnn.cli.common import add_output_flags, add_seed, emit, int_list, positive_int
from msrnn.cli.training import add_training_flags, check_out, summary, train_config
from msrnn.errors import ConfigError


def add_convert(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="convert a pretrained model into another family")
    cs = c.add_subparsers(dest="convert_cmd", required=True, metavar="FAMILY")
    p = cs.add_parser("supra", help="softmax Llama/Mistral/Qwen2 -> SUPRA linear-attention RNN (weights copied)",
                      description="Copy every weight of --from into a SupraForCausalLM; the feature maps phi are "
                                  "new (nn.Linear default init, as the official code). Uptrain it with "
                                  "'msrnn train supra'.")
    p.add_argument("--from", dest="source", required=True, help="model directory or hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--decay", default="lightning", help="lightning (official default) | retnet | none")
    p.add_argument("--feature-map", default="dense", help="dense (official: one Linear across heads) | per_head")
    p.add_argument("--feature-dim", type=positive_int, default=None,
                   help="phi's width per head (default: the head dimension); the state is [H, F, head_dim] per layer")
    add_seed(p)
    add_output_flags(p)
    p.set_defaults(func=run_convert_supra)


def add_train_supra(ts: argparse._SubParsersAction) -> None:
    p = ts.add_parser("supra", help="uptrain a converted SUPRA model (all parameters, warmup + cosine)")
    p.add_argument("--from", dest="source", required=True, help="a directory made by 'msrnn convert supra'")
    add_training_flags(p, max_steps=200, lr=1e-3, warmup_steps=20, eval_every=50, save_every=100)
    p.set_defaults(func=run_train_supra)


def run_convert_supra(args: argparse.Namespace) -> int:
    from msrnn.io import atomic_dir, write_json
    from msrnn.models.loading import load_hf_causal_lm, load_tokenizer_for
    from msrnn.supra import convert
    from msrnn.supra.convert import convert_dir

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another --out")
    knobs = {"decay": args.decay, "feature_map": args.feature_map, "seed": args.seed, "feature_dim": args.feature_dim}
    tokenizer = load_tokenizer_for(args.source)
    # A folder streams tensor by tensor (one model in memory); a hub id, or a folder whose tensors do not map one
    # to one, is loaded whole and converted.
    supra = convert_dir(args.source, **knobs) if Path(args.source).is_dir() else None
    streamed = supra is not None
    if supra is None:
        model = load_hf_causal_lm(args.source)
        supra = convert(model, **knobs)
        del model
    with atomic_dir(out) as tmp:
        supra.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "msrnn.json", {"family": "supra", "source": str(args.source), "decay": args.decay,
                                        "feature_map": args.feature_map, "total_steps": 0})
    res = {"out": str(out), "params": sum(p.numel() for p in supra.parameters()), "decay": args.decay,
           "feature_map": args.feature_map, "streamed": streamed}
    return emit(args, "convert supra", res)


def run_train_supra(args: argparse.Namespace) -> int:
    from msrnn.families import FAMILIES
    from msrnn.models.loading import family_of, load_hf_causal_lm, load_tokenizer_for, read_meta
    from msrnn.train.pretrain import PretrainConfig, train_lm

    src = Path(args.source)
    supra = FAMILIES.get("supra")
    if FAMILIES.get(family_of(src)) is not supra:
        raise ConfigError(f"{src} is not a SUPRA model directory; make one with 'msrnn convert supra --from M'")
    out = check_out(args)
    model = load_hf_causal_lm(src).train()  # on the CPU: the trainer's Accelerator places it, each rank on its own
    tokenizer = load_tokenizer_for(src)
    cfg = PretrainConfig(preset=None, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                         repeat_fraction=args.repeat_fraction, packing=args.packing)
    meta = {**read_meta(src), "family": supra.name, "uptrained_from": str(src)}
    trainer, result = train_lm(model, tokenizer, cfg, train_config(args), out, meta, resume=args.resume,
                               progress=not args.quiet)
    return emit(args, "train supra", summary(out, trainer, result))


def add_bench_supra(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("supra", help="linear attention: chunked vs naive vs softmax SDPA; decode at 1k vs 64k")
    p.add_argument("--model", default=None, help="SUPRA model dir for the decode part (default: a random small one)")
    p.add_argument("--lengths", default="256,1024,4096,16384")
    p.add_argument("--positions", default="1024,65536")
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--dim", type=positive_int, default=64)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--out", default=None)
    add_output_flags(p)
    p.set_defaults(func=run_bench_supra)


def run_bench_supra(args: argparse.Namespace) -> int:
    from msrnn.bench.rows import Column, dash, render
    from msrnn.bench.supra import bench_decode, bench_ops
    from msrnn.io import write_json
    from msrnn.provenance import stamped
    from msrnn.ui import err_console, out_console, print_json

    lengths, positions = int_list(args.lengths, "--lengths"), int_list(args.positions, "--positions")
    with err_console.status("timing linear attention forms"):
        ops = bench_ops(lengths, heads=args.heads, dim=args.dim, rounds=args.rounds)
    if args.model:
        from msrnn.models.loading import load_hf_causal_lm

        model = load_hf_causal_lm(args.model)
    else:
        from msrnn.models.presets import build_model
        from msrnn.supra import convert

        model = convert(build_model("small", 4096))
    with err_console.status(f"prefilling to {max(positions)} tokens and timing decode"):
        dec = bench_decode(model, positions, rounds=args.rounds)
    result = {"ops": ops, "decode": dec, "model": args.model or "random small"}
    if args.out:
        write_json(Path(args.out) / "results.json", stamped(result))
    if args.json:
        print_json(result)
        return 0
    cols = [Column("T", lambda r: r.T), Column("naive ms", lambda r: dash(r.naive_ms)),
            Column("chunked ms", lambda r: r.chunked_ms), Column("sdpa ms", lambda r: r.sdpa_ms),
            Column("chunked vs naive", lambda r: dash(r.chunked_vs_naive)),
            Column("sdpa / chunked", lambda r: r.sdpa_over_chunked)]
    out_console.print(render(f"linear attention, 1 x {args.heads} heads x d {args.dim} (median of {args.rounds})",
                             ops["rows"], cols))
    out_console.print(f"crossover (linear faster than softmax SDPA from): T = {ops['crossover_T']}")
    out_console.print(render("decode", dec["rows"], [Column("position", lambda r: r.position),
                                                     Column("ms/token", lambda r: r.ms_per_token),
                                                     Column("state bytes", lambda r: r.state_bytes)]))
    out_console.print(f"ratio {dec['rows'][-1].position} vs {dec['rows'][0].position}: "
                      f"{dec['ratio_last_first']:.3f}")
    return 0
