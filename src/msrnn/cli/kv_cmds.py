"""``msrnn kv sweep``, ``msrnn kv analyze`` and ``msrnn bench kv``."""

from __future__ import annotations

import argparse
from pathlib import Path

from msrnn.cli.common import add_output_flags, positive_int, resolve_device


def add_kv(sub: argparse._SubParsersAction) -> None:
    kv = sub.add_parser("kv", help="KV eviction studies (perplexity vs budget, retention analysis)")
    kvs = kv.add_subparsers(dest="kv_cmd", required=True, metavar="STUDY")

    p = kvs.add_parser("sweep", help="perplexity versus multi-state size for several policies (TOVA Fig. 3)",
                       description="Stream held-out documents of --context tokens with each policy at budgets that "
                                   "are fractions of the context; a table, JSON and one PNG per task.")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="stdlib:test")
    p.add_argument("--documents", default="file", choices=["file", "folder"])
    p.add_argument("--context", type=positive_int, default=512)
    p.add_argument("--fractions", default="1/16,1/8,1/4,1/2")
    p.add_argument("--policies", default="window,sink,h2o,tova",
                   help="comma list of policy specs, e.g. tova,tova:per_head=true,h2o:per_head=false,sink:sinks=1")
    p.add_argument("--tasks", default="plain,copy", help="plain (held-out text) and/or copy (repeated window)")
    p.add_argument("--max-docs", type=positive_int, default=16)
    p.add_argument("--chunk-size", type=positive_int, default=64,
                   help="exact eviction: any value gives the same result")
    p.add_argument("--out", default=None, help="folder for results.json and the PNGs")
    p.add_argument("--device", default="auto")
    add_output_flags(p)
    p.set_defaults(func=run_sweep_cmd)

    a = kvs.add_parser("analyze", help="which positions and token kinds a policy keeps (TOVA Figs. 7-9)")
    a.add_argument("--model", required=True)
    a.add_argument("--policy", default="tova")
    a.add_argument("--budget", type=positive_int, default=64)
    a.add_argument("--data", default="stdlib:test")
    a.add_argument("--max-tokens", type=positive_int, default=512)
    a.add_argument("--max-docs", type=positive_int, default=4)
    a.add_argument("--out", default="kv_analysis", help="folder for the heatmap PNG and results.json")
    a.add_argument("--device", default="auto")
    add_output_flags(a)
    a.set_defaults(func=run_analyze_cmd)


def add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    bs = b.add_subparsers(dest="bench_cmd", required=True, metavar="WHAT")
    p = bs.add_parser("kv", help="decode tokens/s and KV bytes vs context: full cache vs window/TOVA at a budget")
    p.add_argument("--model", required=True)
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    p.add_argument("--budget", type=positive_int, default=512)
    p.add_argument("--steps", type=positive_int, default=32)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--device", default="auto")
    add_output_flags(p)
    p.set_defaults(func=run_bench_kv)
    from msrnn.cli.supra_cmds import add_bench_supra

    add_bench_supra(bs)
    add_bench_stream(bs)
    from msrnn.cli.bst_cmds import add_bench_bst

    add_bench_bst(bs)
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


def _save(out: str | None, name: str, obj) -> str | None:
    if not out:
        return None
    from msrnn.io import write_json

    path = Path(out) / name
    write_json(path, obj)
    return str(path)


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from msrnn.evaluate.documents import eval_documents
    from msrnn.kv.sweep import SweepConfig, parse_fractions, plot_sweep, run_sweep
    from msrnn.models import load_lm
    from msrnn.ui import err_console, out_console, print_json, table

    cfg = SweepConfig(context=args.context, fractions=parse_fractions(args.fractions),
                      policies=[p for p in args.policies.split(",") if p],
                      tasks=[t for t in args.tasks.split(",") if t],
                      chunk_size=args.chunk_size, max_documents=args.max_docs)
    lm = load_lm(args.model, device=resolve_device(args.device))
    docs = eval_documents(args.data, lm.tokenizer, unit=args.documents, min_tokens=cfg.context // 2,
                          max_tokens=cfg.context)

    def progress(row):
        if not (args.quiet or args.json):
            err_console.print(f"  {row['task']:5s} {row['policy']:>24s} @ {row['budget']:5d}: ppl {row['ppl']:.3f}")

    result = run_sweep(lm, [d.ids for d in docs], cfg, progress=progress)
    result.update({"model": str(args.model), "data": args.data})
    if args.out:
        result["plots"] = plot_sweep(result, str(Path(args.out) / "ppl_vs_budget"))
        _save(args.out, "results.json", result)
    if args.json:
        print_json(result)
        return 0
    for task in cfg.tasks:
        rows = [r for r in result["rows"] if r["task"] == task]
        budgets = sorted({r["budget"] for r in rows if r["policy"] != "full"})
        specs = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"))
        full = next(r["ppl"] for r in rows if r["policy"] == "full")
        body = [[spec] + [next((f"{r['ppl']:.2f}" for r in rows if r["policy"] == spec and r["budget"] == b), "-")
                          for b in budgets] for spec in specs]
        body.append(["full"] + [f"{full:.2f}"] * len(budgets))
        out_console.print(table(f"perplexity ({task}), context {cfg.context}", ["policy"] + [str(b) for b in budgets],
                                body))
    if args.out:
        out_console.print(f"plots: {', '.join(result['plots'])}")
    return 0


def run_analyze_cmd(args: argparse.Namespace) -> int:
    import numpy as np

    from msrnn.evaluate.documents import eval_documents
    from msrnn.kv import make_policy, wrap
    from msrnn.kv.analysis import plot_retention, token_kind, trace_retention
    from msrnn.models import load_lm
    from msrnn.ui import out_console, print_json, table

    lm = load_lm(args.model, device=resolve_device(args.device))
    blm = wrap(lm, make_policy(args.policy, args.budget))
    docs = eval_documents("stdlib:test" if args.data is None else args.data, lm.tokenizer,
                          min_tokens=args.max_tokens, max_tokens=args.max_tokens, max_documents=args.max_docs)
    survival, kinds = [], []
    plot = None
    for i, doc in enumerate(docs):
        trace = trace_retention(blm, doc.ids)
        if i == 0:
            plot = plot_retention(trace, Path(args.out) / "retention.png",
                                  title=f"{blm.policy.describe()} on {doc.name}")
        survival.append(trace.first_token_survival())
        kinds.append(trace.kind_enrichment([token_kind(lm.tokenizer.decode([t])) for t in doc.ids]))
    L = len(survival[0])
    surv = [{"layer": layer, **{k: float(np.mean([s[layer][k] for s in survival])) for k in survival[0][layer]
                                if k != "layer"}} for layer in range(L)]
    kind_names = sorted({r["kind"] for ks in kinds for r in ks})
    kind_rows = []
    for kname in kind_names:
        rs = [r for ks in kinds for r in ks if r["kind"] == kname]
        kind_rows.append({"kind": kname, "base_rate": float(np.mean([r["base_rate"] for r in rs])),
                          "kept_share": float(np.mean([r["kept_share"] for r in rs])),
                          "ratio": float(np.mean([r["ratio"] for r in rs]))})
    result = {"policy": blm.policy.describe(), "documents": len(docs), "tokens": args.max_tokens,
              "first_token_survival": surv, "token_kinds": kind_rows, "plot": str(plot)}
    _save(args.out, "results.json", result)
    if args.json:
        print_json(result)
        return 0
    out_console.print(table(f"share of steps (after the cache fills) the first tokens are still kept, "
                            f"{blm.policy.describe()}", list(surv[0].keys()), [list(r.values()) for r in surv]))
    out_console.print(table("token kinds: share of kept slots vs share of tokens seen",
                            ["kind", "base rate", "kept share", "ratio"],
                            [[r["kind"], r["base_rate"], r["kept_share"], r["ratio"]] for r in kind_rows]))
    out_console.print(f"heatmap: {plot}")
    return 0


def run_bench_kv(args: argparse.Namespace) -> int:
    from msrnn.bench.kv import KVBenchConfig, run_kv_bench
    from msrnn.models.loading import load_hf_causal_lm
    from msrnn.ui import err_console, out_console, print_json, table

    try:
        contexts = [int(x) for x in args.contexts.split(",") if x]
    except ValueError:
        from msrnn.errors import ConfigError

        raise ConfigError(f"bad --contexts {args.contexts!r}; write e.g. 1024,4096,16384") from None
    cfg = KVBenchConfig(contexts=contexts, budget=args.budget, steps=args.steps, rounds=args.rounds)
    model = load_hf_causal_lm(args.model, device=resolve_device(args.device))

    def progress(row):
        if not (args.quiet or args.json):
            err_console.print(f"  context {row['context']}: tova/full speed {row['tova/full speed']:.2f}x")

    result = run_kv_bench(model, cfg, progress=progress)
    result["model"] = str(args.model)
    _save(args.out, "results.json", result)
    if args.json:
        print_json(result)
        return 0
    b = cfg.budget
    cols = ["context", "full tok/s", f"window@{b} tok/s", f"tova@{b} tok/s", "tova/full", "tova vs window",
            "full KV MiB", f"tova@{b} KV MiB"]
    body = [[r["context"], r["full tok/s"], r[f"window@{b} tok/s"], r[f"tova@{b} tok/s"],
             f"{r['tova/full speed']:.2f}x", f"{100 * r['tova overhead vs window']:+.1f}%",
             r["full bytes"] / 2**20, r[f"tova@{b} bytes"] / 2**20] for r in result["rows"]]
    out_console.print(table(f"decode speed (median of {cfg.rounds} interleaved rounds of {cfg.steps} steps)",
                            cols, body))
    return 0


def run_bench_costs(args: argparse.Namespace) -> int:
    from msrnn.bench.costs import Arch, cost_table, plot_costs
    from msrnn.errors import ConfigError
    from msrnn.ui import out_console, print_json, table

    if args.model:
        from transformers import AutoConfig

        from msrnn.models.loading import ensure_registered

        ensure_registered(args.model)
        cfg = AutoConfig.from_pretrained(args.model)
    else:
        from msrnn.models.presets import preset_config

        cfg = preset_config(args.preset, 4096)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        raise ConfigError("--lengths takes comma-separated integers") from None
    rows = cost_table(Arch.from_config(cfg), lengths, budget=args.budget, block=args.block, segment=args.segment,
                      memory=args.memory)
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
    p.add_argument("--policy", default="tova", help="with --family kv")
    p.add_argument("--budget", type=positive_int, default=512, help="with --family kv")
    p.add_argument("--memory", type=positive_int, default=16, help="with --family rmt: memory tokens")
    p.add_argument("--segment", type=positive_int, default=512, help="with --family rmt: segment length")
    p.add_argument("--tokens", type=positive_int, default=1_048_576)
    p.add_argument("--chunk-size", type=positive_int, default=512)
    p.add_argument("--out", default=None)
    add_output_flags(p)
    p.set_defaults(func=run_bench_stream)


def run_bench_stream(args: argparse.Namespace) -> int:
    from msrnn.bench.stream import stream_bench
    from msrnn.errors import ConfigError
    from msrnn.models import load_lm
    from msrnn.ui import err_console, out_console, print_json, table

    lm = load_lm(args.model)
    if args.family == "kv":
        from msrnn.kv import make_policy, wrap

        lm = wrap(lm, make_policy(args.policy, args.budget), prefill="oneshot")
    elif args.family == "rmt":
        from msrnn.rmt import RMTLM, MemoryWrapper

        lm = RMTLM(MemoryWrapper.wrap(lm.model, num_memory_tokens=args.memory, segment_length=args.segment))
    elif args.family != "auto":
        raise ConfigError(f"unknown --family {args.family!r}; use auto, kv or rmt")
    with err_console.status(f"streaming {args.tokens:,} tokens"):
        res = stream_bench(lm, args.tokens, chunk=args.chunk_size)
    res.update({"model": args.model, "family": args.family})
    _save(args.out, "results.json", res)
    if args.json:
        print_json(res)
        return 0
    out_console.print(table(f"stream of {res['tokens']:,} tokens ({res['tokens_per_s']:,.0f} tok/s, "
                            f"{res['nonfinite']} non-finite logits)", ["tokens", "RSS MiB", "state bytes",
                                                                       "ms/chunk"],
                            [[r["tokens"], r["rss_mib"], r["state_bytes"], r["ms_per_chunk"]] for r in res["rows"]]))
    return 0
