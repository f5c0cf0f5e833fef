"""``msrnn bench``: every benchmark (ratios measured side by side in one run); each family's own bench parser
lives with its commands and is added here."""

from __future__ import annotations

import argparse
from pathlib import Path

from msrnn.cli.common import add_output_flags, int_list, positive_float, positive_int, resolve_device, save_results


def add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    bs = b.add_subparsers(dest="bench_cmd", required=True, metavar="WHAT")
    p = bs.add_parser("kv", help="decode tokens/s and KV bytes vs context: full cache vs window/TOVA at a budget")
    add_bench_model(p)
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    p.add_argument("--budget", type=positive_int, default=512)
    p.add_argument("--steps", type=positive_int, default=32)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--storage", default="fixed", choices=["fixed", "naive"],
                   help="bounded caches' storage (default fixed: in place; TOVA on the naive twin is timed beside it)")
    p.add_argument("--compile", action="store_true",
                   help="also time TOVA with its in-place decode step under torch.compile (fixed storage; the "
                        "compile runs in the first round's untimed warm-up)")
    p.add_argument("--throughput", action="store_true",
                   help="generated tokens/s at a fixed KV memory budget: the largest batch of full caches vs of "
                        "bounded caches that fit (one context; --steps decode steps per round)")
    p.add_argument("--policy", default=None, help="with --throughput: the bounded cache's policy (default tova)")
    p.add_argument("--memory-mib", type=positive_float, default=None,
                   help="with --throughput: the KV memory budget (default: what --full-batch full caches hold)")
    p.add_argument("--full-batch", type=positive_int, default=None,
                   help="with --throughput and no --memory-mib: full-cache sequences the budget holds (default 4)")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help="with --throughput: cap on either batch, to bound the run time (default 64)")
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--device", default="auto")
    add_output_flags(p)
    p.set_defaults(func=run_bench_kv)
    p = bs.add_parser("kv-prefill", help="prefill tokens/s: full cache vs bounded caches per prefill mode (exact, "
                                         "chunked:C, oneshot)")
    add_bench_model(p)
    p.add_argument("--tokens", type=positive_int, default=8192, help="prompt length (default 8192)")
    p.add_argument("--chunk", type=positive_int, default=512, help="tokens per forward call (default 512)")
    p.add_argument("--budget", type=positive_int, default=512)
    p.add_argument("--policies", default="tova,h2o,window")
    p.add_argument("--modes", default="exact,chunked:64,oneshot",
                   help="prefill modes (default exact,chunked:64,oneshot)")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--reference", action="store_true",
                   help="also time the exact prefill's slow readable twin (one round)")
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--device", default="auto")
    add_output_flags(p)
    p.set_defaults(func=run_bench_kv_prefill)
    from msrnn.cli.supra_cmds import add_bench_supra

    add_bench_supra(bs)
    add_bench_stream(bs)
    from msrnn.cli.bst_cmds import add_bench_bst

    add_bench_bst(bs)
    add_bench_train_memory(bs)
    c = bs.add_parser("costs", help="analytic FLOPs and state bytes vs length for every family (no timing)")
    c.add_argument("--model", default=None, help="model directory to read the architecture from")
    c.add_argument("--preset", default="small", help="architecture preset when --model is not given")
    c.add_argument("--lengths", default="512,2048,8192,32768,131072,1048576")
    c.add_argument("--budget", type=positive_int, default=512, help="KV slots (kv family)")
    c.add_argument("--block", type=positive_int, default=64, help="BST block length")
    c.add_argument("--segment", type=positive_int, default=512, help="RMT segment length")
    c.add_argument("--memory", type=positive_int, default=16, help="RMT memory tokens")
    c.add_argument("--plot", default=None, help="write the two-panel PNG here")
    add_output_flags(c)
    c.set_defaults(func=run_bench_costs)


def add_bench_model(p: argparse.ArgumentParser) -> None:
    """--model DIR or --shape PRESET (a real model's shape with random weights, e.g. qwen2.5-0.5b)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model directory (or a hub id you name)")
    g.add_argument("--shape", help="a preset's shape with random weights: tiny, small, base, qwen2.5-0.5b, "
                                   "llama-3.2-1b")
    p.add_argument("--vocab", type=positive_int, default=None, help="with --shape: vocabulary size (default 4096)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="with --shape: parameter dtype (default float32)")


def load_bench_model(args: argparse.Namespace):
    """The model a bench command measures: loaded from --model, or built from --shape."""
    import torch

    from msrnn.errors import ConfigError
    from msrnn.models.loading import load_hf_causal_lm

    device = resolve_device(args.device)
    if args.model:
        if args.vocab is not None or args.dtype != "float32":
            raise ConfigError("--vocab and --dtype apply to --shape models; a --model keeps its own")
        return load_hf_causal_lm(args.model, device=device)
    from msrnn.models.presets import build_model

    model = build_model(args.shape, args.vocab or 4096)
    return model.to(device=device, dtype=getattr(torch, args.dtype)).eval()


def _saved_or_printed(args: argparse.Namespace, result: dict) -> bool:
    """Name the model in ``result``, write ``--out``, and print it for ``--json``: True when that is all the command
    shows."""
    from msrnn.ui import print_json

    result["model"] = str(args.model or f"shape {args.shape} (random weights)")
    save_results(args.out, "results.json", result)
    if args.json:
        print_json(result)
    return bool(args.json)


def run_bench_kv(args: argparse.Namespace) -> int:
    from msrnn.bench.kv import FULL, PLAIN, TOVA, TOVA_COMPILED, TOVA_NAIVE, WINDOW, KVBenchConfig, run_kv_bench
    from msrnn.bench.rows import Column, percent, ratio, render
    from msrnn.errors import ConfigError
    from msrnn.ui import err_console, out_console

    try:
        contexts = [int(x) for x in args.contexts.split(",") if x]
    except ValueError:
        raise ConfigError(f"bad --contexts {args.contexts!r}; write e.g. 1024,4096,16384") from None
    if args.throughput:
        if args.compile:
            raise ConfigError("--compile times single-sequence decode; drop it with --throughput")
        return _run_bench_kv_throughput(args, contexts)
    given = [f for f in ("policy", "memory_mib", "full_batch", "max_batch") if getattr(args, f) is not None]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} only applies with --throughput; add --throughput or "
                          "drop it")
    cfg = KVBenchConfig(contexts=contexts, budget=args.budget, steps=args.steps, rounds=args.rounds,
                        storage=args.storage, compile=args.compile)
    model = load_bench_model(args)

    def progress(row):
        if not (args.quiet or args.json):
            err_console.print(f"  context {row.context}: tova/full speed {row.tova_full:.2f}x")

    result = run_kv_bench(model, cfg, progress=progress)
    if _saved_or_printed(args, result):
        return 0
    rows, b = result["rows"], cfg.budget
    label = rows[0].label

    def speed(v):
        return Column(label(v), lambda r: r.tok_s[v])

    # "of ceiling" is (tova/full) / (plain/full) = tova/plain: one column for both.
    cols = [Column("context", lambda r: r.context), *map(speed, (FULL, PLAIN, WINDOW, TOVA)),
            Column("tova/full", lambda r: ratio(r.tova_full)), Column("ceiling", lambda r: ratio(r.ceiling)),
            Column("of ceiling", lambda r: percent(r.tova_of_ceiling)),
            Column("tova/window", lambda r: ratio(r.speed(TOVA, WINDOW)))]
    if cfg.storage == "fixed":
        cols.append(Column("fixed/naive", lambda r: ratio(r.speed(TOVA, TOVA_NAIVE))))
    if cfg.compile:
        form = "compiled (fell back to eager)" if result["compile_fell_back_to_eager"] else "compiled"
        cols += [Column(f"tova@{b} {form}", lambda r: r.tok_s[TOVA_COMPILED]),
                 Column(f"{form}/eager", lambda r: ratio(r.speed(TOVA_COMPILED, TOVA))),
                 Column(f"{form}/plain", lambda r: ratio(r.speed(TOVA_COMPILED, PLAIN)))]
    out_console.print(render(f"decode tok/s (median of {cfg.rounds} interleaved rounds of {cfg.steps} steps; "
                             f"ceiling = plain@{b} / full)", rows, cols))
    cols = [Column("context", lambda r: r.context),
            Column("full KV MiB", lambda r: r.state_bytes[FULL] / 2**20),
            Column(f"{label(TOVA)} KV MiB", lambda r: r.state_bytes[TOVA] / 2**20),
            Column("full limit tok/s", lambda r: r.limit_tok_s[FULL]),
            Column("full / limit", lambda r: percent(r.limit_share(FULL))),
            Column(f"{label(TOVA)} limit tok/s", lambda r: r.limit_tok_s[TOVA]),
            Column("tova / limit", lambda r: percent(r.limit_share(TOVA)))]
    out_console.print(render(f"physical limit: copy bandwidth {result['copy bandwidth GB/s']:.1f} GB/s over weights "
                             f"({result['weight bytes'] / 2**20:.1f} MiB) + KV bytes per step", rows, cols))
    return 0


def _run_bench_kv_throughput(args: argparse.Namespace, contexts: list[int]) -> int:
    from msrnn.bench.kv import KVThroughputBenchConfig, run_kv_throughput_bench
    from msrnn.bench.rows import Column, render
    from msrnn.errors import ConfigError
    from msrnn.kv import KVSettings
    from msrnn.ui import err_console, out_console

    if len(contexts) != 1:
        raise ConfigError(f"--throughput measures one context; give one, e.g. --contexts {contexts[-1]}")
    if args.memory_mib is not None and args.full_batch is not None:
        raise ConfigError("give --memory-mib or --full-batch, not both (--full-batch sizes the memory budget)")
    policy = args.policy or "tova"
    KVSettings(policy, args.budget)  # an unknown policy is refused before the model loads
    memory = None if args.memory_mib is None else int(args.memory_mib * 2**20)
    cfg = KVThroughputBenchConfig(context=contexts[0], budget=args.budget, policy=policy, steps=args.steps,
                                  rounds=args.rounds, memory_bytes=memory, full_batch=args.full_batch or 4,
                                  max_batch=args.max_batch or 64, storage=args.storage)
    model = load_bench_model(args)

    def progress(msg):
        if not (args.quiet or args.json):
            err_console.print(f"  {msg}")

    result = run_kv_throughput_bench(model, cfg, progress=progress)
    if _saved_or_printed(args, result):
        return 0
    cols = [Column("variant", lambda r: r.variant),
            Column("batch", lambda r: f"{r.batch}{' (capped)' if r.capped else ''}"),
            Column("KV MiB / seq", lambda r: r.peak_bytes_per_sequence / 2**20),
            Column("KV MiB", lambda r: r.peak_bytes / 2**20), Column("tok/s / seq", lambda r: r.tok_s_per_sequence),
            Column("tok/s", lambda r: r.tok_s)]
    out_console.print(render(
        f"throughput at a {result['memory bytes'] / 2**20:.1f} MiB KV budget, context {cfg.context} "
        f"(median of {cfg.rounds} interleaved rounds of {cfg.steps} steps): {result['throughput ratio']:.2f}x",
        result["rows"], cols))
    return 0


def run_bench_kv_prefill(args: argparse.Namespace) -> int:
    from msrnn.bench.kv import KVPrefillBenchConfig, run_kv_prefill_bench
    from msrnn.bench.rows import Column, ratio, render
    from msrnn.kv import KVSettings
    from msrnn.ui import err_console, out_console

    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        KVSettings(p, args.budget)  # an unknown policy is refused before the model loads
    cfg = KVPrefillBenchConfig(tokens=args.tokens, chunk=args.chunk, budget=args.budget, policies=policies,
                               modes=[m for m in args.modes.split(",") if m], rounds=args.rounds,
                               ref=args.reference)
    model = load_bench_model(args)

    def progress(name, tps):
        if not (args.quiet or args.json):
            err_console.print(f"  {name}: {tps:,.0f} tok/s")

    result = run_kv_prefill_bench(model, cfg, progress=progress)
    if _saved_or_printed(args, result):
        return 0
    cols = [Column("variant", lambda r: r.variant), Column("tok/s", lambda r: r.tok_s),
            Column("vs full", lambda r: ratio(r.vs_full)), Column("rounds", lambda r: r.rounds)]
    out_console.print(render(f"prefill of {cfg.tokens} tokens in {cfg.chunk}-token chunks (median of interleaved "
                             "rounds)", result["rows"], cols))
    return 0


def run_bench_costs(args: argparse.Namespace) -> int:
    from msrnn.bench.costs import Arch, cost_table, plot_costs
    from msrnn.ui import out_console, print_json, table

    if args.model:
        from transformers import AutoConfig

        from msrnn.errors import ModelLoadError
        from msrnn.models.loading import ensure_registered, reject_remote_code

        if not Path(args.model).exists() and str(args.model).startswith((".", "/", "~")):
            raise ModelLoadError(f"model path {args.model} does not exist; check the path")
        reject_remote_code(args.model)
        ensure_registered(args.model)
        try:
            cfg = AutoConfig.from_pretrained(args.model, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read a config from {args.model} ({str(exc).splitlines()[0]})") from None
    else:
        from msrnn.models.presets import preset_config

        cfg = preset_config(args.preset, 4096)
    lengths = int_list(args.lengths, "--lengths")
    rows = cost_table(Arch.from_config(cfg), lengths, budget=args.budget, block_size=args.block,
                      segment_length=args.segment, num_memory_tokens=args.memory)
    plot = plot_costs(rows, args.plot) if args.plot else None
    if args.json:
        print_json({"rows": rows, "plot": plot})
        return 0
    out_console.print(table("analytic cost model", ["family", "length", "GFLOPs", "state bytes"],
                            [[r["family"], r["length"], r["flops"] / 1e9, int(r["state_bytes"])] for r in rows]))
    if plot:
        out_console.print(f"plot: {plot}")
    return 0


def add_bench_stream(bs: argparse._SubParsersAction) -> None:
    p = bs.add_parser("stream", help="stream N tokens (e.g. 1M) through a bounded model: RSS, time, state, NaN check")
    p.add_argument("--model", required=True, help="model directory (any family)")
    p.add_argument("--family", default="auto", help="auto (from the model dir) | kv | rmt")
    p.add_argument("--policy", default=None, help="with --family kv (default tova)")
    p.add_argument("--budget", type=positive_int, default=None, help="with --family kv (default 512)")
    p.add_argument("--memory", type=positive_int, default=None, help="with --family rmt: memory tokens (default 16)")
    p.add_argument("--segment", type=positive_int, default=None, help="with --family rmt: segment length (default 512)")
    p.add_argument("--tokens", type=positive_int, default=1_048_576)
    p.add_argument("--chunk-size", type=positive_int, default=512)
    p.add_argument("--out", default=None)
    add_output_flags(p)
    p.set_defaults(func=run_bench_stream)


# bench stream's flags -> the knob each sets, in the family that has it (--policy/--budget: kv; --memory/--segment: rmt)
STREAM_KNOBS = {"policy": "policy", "budget": "budget", "memory": "num_memory_tokens", "segment": "segment_length"}


def run_bench_stream(args: argparse.Namespace) -> int:
    from msrnn.bench.rows import Column, render
    from msrnn.bench.stream import stream_bench
    from msrnn.errors import ConfigError
    from msrnn.families import FAMILIES
    from msrnn.models import load_lm
    from msrnn.ui import err_console, out_console, print_json

    applied = [n for n in FAMILIES.names() if FAMILIES.get(n).applies]
    if args.family != "auto" and args.family not in applied:
        raise ConfigError(f"unknown --family {args.family!r}; use auto, {' or '.join(applied)}")
    given = {knob: getattr(args, flag) for flag, knob in STREAM_KNOBS.items() if getattr(args, flag) is not None}
    spec = FAMILIES.get(args.family) if args.family != "auto" else None
    ignored = [flag for flag, knob in STREAM_KNOBS.items()
               if knob in given and (spec is None or knob not in spec.knob_names())]
    if ignored:  # refused before loading anything, not accepted and ignored
        owner = next(n for n in applied if STREAM_KNOBS[ignored[0]] in FAMILIES.get(n).knob_names())
        raise ConfigError(f"{', '.join('--' + f for f in ignored)} only apply with --family {owner}; with --family "
                          f"{args.family} they would be ignored")
    lm = load_lm(args.model)
    if spec is not None:
        # A million-token stream prefills each chunk in one shot where the family has that choice (KV eviction).
        streaming = {"prefill": "oneshot"} if "prefill" in spec.knob_names() else {}
        lm = spec.apply(lm, spec.knobs(**streaming, **given))
    with err_console.status(f"streaming {args.tokens:,} tokens"):
        res = stream_bench(lm, args.tokens, chunk=args.chunk_size)
    res.update({"model": args.model, "family": args.family})
    save_results(args.out, "results.json", res)
    if args.json:
        print_json(res)
        return 0
    cols = [Column("tokens", lambda r: r.tokens), Column("RSS MiB", lambda r: r.rss_mib),
            Column("state bytes", lambda r: r.state_bytes), Column("ms/chunk", lambda r: r.ms_per_chunk)]
    out_console.print(render(f"stream of {res['tokens']:,} tokens ({res['tokens_per_s']:,.0f} tok/s, "
                             f"{res['nonfinite']} non-finite logits)", res["rows"], cols))
    return 0


def add_bench_train_memory(bs: argparse._SubParsersAction) -> None:
    p = bs.add_parser("train-memory", help="peak memory of a training step at a real shape, full logits vs the "
                                           "chunked loss and activation checkpointing (counted, not run)")
    p.add_argument("--shape", default="llama-3.2-1b", help="preset shape (default llama-3.2-1b)")
    p.add_argument("--vocab", type=positive_int, default=128256, help="vocabulary (default 128256, Llama 3's)")
    p.add_argument("--lengths", default="2048,8192", help="tokens per step (default 2048,8192)")
    p.add_argument("--families", default="hf,supra",
                   help="hf (the softmax Llama itself), supra, rmt: each made from the shape's Llama "
                        "(default hf,supra)")
    p.add_argument("--precision", default="bf16-mixed", choices=["fp32", "bf16-mixed", "bf16"],
                   help="as in training (default bf16-mixed: fp32 masters, bf16 autocast)")
    p.add_argument("--chunk-tokens", type=positive_int, default=1024, help="positions per loss chunk (default 1024)")
    p.add_argument("--out", default=None, help="write results.json here")
    add_output_flags(p)
    p.set_defaults(func=run_bench_train_memory)


def run_bench_train_memory(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from msrnn.bench.train_memory import run
    from msrnn.errors import ConfigError
    from msrnn.families import FAMILIES, FamilySpec
    from msrnn.models.presets import PRESETS
    from msrnn.ui import err_console, out_console, print_json, table

    lengths = int_list(args.lengths, "--lengths")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    # The families whose trainable module is made from a base decoder (their spec defines make).
    usable = [n for n in FAMILIES.names() if type(FAMILIES.get(n)).make is not FamilySpec.make]
    bad = [f for f in families if f not in usable]
    if bad or not families:
        raise ConfigError(f"unknown family {bad[0] if bad else args.families!r} in --families; use "
                          f"{', '.join(usable)}")
    if args.shape not in PRESETS:
        raise ConfigError(f"unknown --shape {args.shape!r}; use one of {', '.join(PRESETS)}")
    total = len(families) * len(lengths) * 3
    with Progress(console=err_console, disable=args.quiet or args.json, transient=True) as bar:
        task = bar.add_task("counting", total=total)
        result = run(families, args.shape, args.vocab, lengths, args.precision, args.chunk_tokens,
                     progress=lambda: bar.advance(task))
    result["command"] = "msrnn bench train-memory"
    save_results(args.out, "results.json", result)
    if args.json:
        print_json(result)
        return 0
    rows = [[r["family"], r["tokens"], r["loss"], "on" if r["activation_checkpointing"] else "off", r["saved_mib"],
             r["saved_kib_per_token"], r["backward_peak_mib"], r["step_peak_mib"]] for r in result["rows"]]
    out_console.print(table(f"training step memory at {args.shape} (vocab {args.vocab:,}, {args.precision}; live "
                            "tensor bytes, counted on fake tensors)",
                            ["family", "tokens", "loss", "act. ckpt", "kept for backward MiB", "KiB/token",
                             "fwd+bwd peak MiB", "step peak MiB"], rows))
    if result["per_token"]:
        lo, hi = result["per_token"][0]["between"]
        out_console.print(table(f"kept for backward per token (slope between {lo} and {hi} tokens)",
                                ["family", "loss", "act. ckpt", "KiB/token"],
                                [[p["family"], p["loss"], "on" if p["activation_checkpointing"] else "off",
                                  p["kib_per_token"]] for p in result["per_token"]]))
    return 0
