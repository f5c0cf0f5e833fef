"""``msrnn doctor``: the versions, transformers contracts and verification verdicts msrnn relies on, as a table."""

from __future__ import annotations

import argparse

from msrnn.cli.common import add_output_flags


def add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="show what msrnn verified on this torch/transformers (and on a model)",
                       description="Check every transformers contract msrnn relies on, verify KV eviction on a tiny "
                                   "twin of --model's class and config (a tiny Llama by default; only config.json is "
                                   "read, never weights or code), and run SUPRA, BST and RMT's self-checks on the "
                                   "installed transformers. Verdicts are cached per config and versions.")
    p.add_argument("--model", default=None, help="a model folder or hub id whose config to verify")
    p.add_argument("--architectures", action="store_true",
                   help="also verify every causal-LM type the installed transformers ships (about a minute)")
    add_output_flags(p)
    p.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from msrnn import doctor
    from msrnn.kv.verify import causal_lm_types, check_architecture
    from msrnn.models.selfcheck import tiny_llama
    from msrnn.ui import err_console, out_console, print_json, table

    rows = doctor.version_rows()
    model = doctor.model_from_config_source(args.model) if args.model else None  # a bad --model fails first
    types = causal_lm_types() if args.architectures else []
    archs = []
    with Progress(TextColumn("[bold]doctor {task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err_console, disable=args.quiet, transient=True) as bar:
        task = bar.add_task("self-checks", total=2 + (model is not None) + len(types))
        rows += doctor.kv_rows(tiny_llama(), "kv: tiny Llama")
        bar.advance(task)
        if model is not None:
            rows += doctor.kv_rows(model, f"kv: {args.model}")
            bar.advance(task)
        rows += doctor.family_rows()
        bar.advance(task)
        for model_type in types:
            bar.update(task, description=model_type)
            archs.append(asdict(check_architecture(model_type)))
            bar.advance(task)
    if args.json:
        print_json({"rows": [asdict(r) for r in rows], "architectures": archs})
        return 0
    out_console.print(table("msrnn doctor", ["subject", "check", "result"],
                            [(r.subject, r.check, r.result) for r in rows]))
    if archs:
        out_console.print(table("every causal-LM type of this transformers", ["model type", "class", "outcome",
                                                                             "rolling positions / reason"],
                                [(a["model_type"], a["model_class"], a["outcome"],
                                  a["rolling"] if a["outcome"] == "verified" else a["reason"]) for a in archs]))
    return 0
