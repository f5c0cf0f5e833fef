"""``msrnn kv sweep`` and ``msrnn kv analyze``."""

from __future__ import annotations

import argparse
from pathlib import Path

from msrnn.cli.common import add_output_flags, positive_int, resolve_device, save_results


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


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from msrnn.evaluate.documents import eval_documents
    from msrnn.models import load_lm
    from msrnn.studies.kv_sweep import SweepConfig, parse_fractions, plot_sweep, run_sweep
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
        save_results(args.out, "results.json", result)
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

    from msrnn.errors import ConfigError
    from msrnn.evaluate.documents import eval_documents
    from msrnn.kv import KVSettings, apply_kv
    from msrnn.models import load_lm
    from msrnn.studies.kv_analysis import plot_retention, token_kind, trace_retention
    from msrnn.ui import out_console, print_json, table

    settings = KVSettings(args.policy, args.budget)  # checked before the model loads
    if settings.budget is None or args.max_tokens <= settings.budget:
        raise ConfigError(f"--max-tokens {args.max_tokens} never fills a budget of {settings.budget} slots, so nothing "
                          "would be evicted and every retention figure would read 'kept'; use --max-tokens > --budget")
    lm = load_lm(args.model, device=resolve_device(args.device))
    blm = apply_kv(lm, settings)
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
    save_results(args.out, "results.json", result)
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
