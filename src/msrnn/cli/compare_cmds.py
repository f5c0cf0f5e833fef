"""``msrnn compare``: every family on the same documents (and tasks) at equal state bytes, as a report folder."""

from __future__ import annotations

import argparse

from msrnn.cli.common import add_output_flags, int_list, positive_int


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare KV eviction, SUPRA, BST and RMT at equal state bytes",
                       description="Evaluate the base model's full cache, KV policies at each --state-bytes budget "
                                   "and at each --models directory's own state size, those bounded models, and "
                                   "(--build) SUPRA/BST/RMT built from the base at each budget, on "
                                   "the same held-out documents; write report.md, PNGs and results.json to --out. "
                                   "Finished entries are kept, so rerunning resumes.")
    p.add_argument("--base", required=True, help="base decoder model directory (the KV family's model)")
    p.add_argument("--models", default="", help="comma-separated trained SUPRA / BST / RMT directories")
    p.add_argument("--state-bytes", default="", help="comma-separated state budgets in bytes per sequence (KV "
                   "policies are fitted and --build models sized to each)")
    p.add_argument("--policies", default="window,sink,h2o,tova")
    p.add_argument("--build", default="", help="comma-separated families to build from --base at every budget: "
                                               "supra,bst,rmt (sized so their measured state fits; cached)")
    p.add_argument("--build-tokens", type=positive_int, default=262_144,
                   help="training tokens per built model, the same for every family and budget")
    p.add_argument("--build-data", default="stdlib", help="training data for built models (its train split)")
    p.add_argument("--build-seq-len", type=positive_int, default=512)
    p.add_argument("--task-steps", type=int, default=0,
                   help="also fine-tune the base model (for KV) and every built model on --task for this many steps "
                        "(the same samples for all), and score those copies too")
    p.add_argument("--data", default="stdlib:test")
    p.add_argument("--documents", default="folder", choices=["file", "folder"])
    p.add_argument("--max-tokens", type=positive_int, default=2048, help="tokens per document (documents shorter "
                                                                         "than this are skipped)")
    p.add_argument("--max-docs", type=positive_int, default=6)
    p.add_argument("--chunk-size", type=positive_int, default=128)
    p.add_argument("--task", default=None, help="also score this memory task (models trained on it)")
    p.add_argument("--segments", default="1,4,16", help="task lengths in segments")
    p.add_argument("--segment-length", type=positive_int, default=128)
    p.add_argument("--samples", type=positive_int, default=50)
    p.add_argument("--longctx", default="", help="also run these long-context probes per entry (msrnn eval longctx's "
                   "tasks, e.g. passkey,niah_single)")
    p.add_argument("--longctx-lengths", default="512,1024,2048", help="probe lengths in tokens")
    p.add_argument("--longctx-depths", default="0,0.5,1", help="needle depths (fractions)")
    p.add_argument("--longctx-samples", type=positive_int, default=5, help="samples per length and depth")
    p.add_argument("--profile-tokens", type=positive_int, default=8192,
                   help="stream this many tokens per entry for tokens/s and state versus length")
    p.add_argument("--probe-tokens", type=positive_int, default=2048,
                   help="stream this many tokens one at a time to find each model's largest state (>= 2 x its "
                        "longest block or segment)")
    p.add_argument("--out", default="reports", help="root folder; the report goes to a sub-folder named from the "
                                                    "config (default reports/)")
    p.add_argument("--fresh", action="store_true", help="re-run every entry instead of resuming")
    add_output_flags(p)
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from msrnn.cli.longctx_cmds import _depths
    from msrnn.compare import CompareConfig, compare
    from msrnn.ui import out_console, print_json, table

    cfg = CompareConfig(base=args.base, models=[m for m in args.models.split(",") if m],
                        state_bytes=int_list(args.state_bytes, "--state-bytes") if args.state_bytes else [],
                        policies=[p for p in args.policies.split(",") if p], data=args.data,
                        documents=args.documents, max_tokens=args.max_tokens, max_docs=args.max_docs,
                        chunk_size=args.chunk_size, task=args.task,
                        task_segments=int_list(args.segments, "--segments"), segment_length=args.segment_length,
                        task_samples=args.samples, profile_tokens=args.profile_tokens,
                        probe_tokens=args.probe_tokens,
                        build=[f for f in args.build.split(",") if f], build_tokens=args.build_tokens,
                        build_data=args.build_data, build_seq_len=args.build_seq_len, task_steps=args.task_steps,
                        longctx=[t for t in args.longctx.split(",") if t],
                        longctx_lengths=int_list(args.longctx_lengths, "--longctx-lengths"),
                        longctx_depths=_depths(args.longctx_depths), longctx_samples=args.longctx_samples)
    report = compare(cfg, args.out, resume=not args.fresh, progress=not (args.quiet or args.json))
    if args.json:
        print_json(report)
        return 0
    rows = [[e["name"], e["family"], e["state_bytes"], e["ppl"], e["tokens_per_s"], "yes" if e["resumed"] else ""]
            for e in sorted(report["entries"], key=lambda e: (e["state_bytes"], e["ppl"]))]
    out_console.print(table("perplexity at equal state bytes", ["entry", "family", "state bytes", "ppl", "tok/s",
                                                               "resumed"], rows))
    for note in report["notes"]:
        out_console.print(f"note: {note}")
    out_console.print(f"report: {report['folder']}/report.md")
    return 0
