"""``msrnn demo``: the main job on a fresh CPU machine, in under 10 minutes on 2 cores.

1. trains (or reuses from the user cache) a 4096-token BPE and the ``small`` Llama on the stdlib corpus;
2. streams held-out stdlib documents through the protocol and prints perplexity versus position, including
   positions past the 512 the model was trained on (where a softmax transformer's full cache degrades);
3. checks the model uses its context: PPL on the copy of a repeated held-out window versus its first half;
4. streams the same documents as bounded multi-state RNNs (Window, Window+4, H2O, TOVA at a small KV budget)
   and reports perplexity against state bytes;
5. bounds the same model the other three ways -- SUPRA, BST:SH and an RMT, each sized to one state budget and
   trained on the same few tokens -- and runs ``msrnn compare`` on all four families at those bytes
   (``--no-families`` skips this);
6. writes PNGs and says where everything is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from msrnn.cli.common import add_output_flags, add_seed, positive_int


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small model on the stdlib and stream held-out code (the main job)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=positive_int, default=380,
                   help="training steps of the small model (default 380: ~1.6M tokens, ~7 min on 2 cores)")
    p.add_argument("--preset", default="small")
    p.add_argument("--repeat-fraction", type=float, default=0.5,
                   help="share of training sequences whose second half repeats the first (default 0.5: with only "
                        "~1.5M training tokens, a strong copy signal is what makes the model use its context)")
    p.add_argument("--eval-tokens", type=positive_int, default=2048, help="tokens per held-out document")
    p.add_argument("--chunk-size", type=positive_int, default=256)
    p.add_argument("--kv-budget", type=positive_int, default=64, help="KV slots per layer for the eviction part")
    p.add_argument("--kv-docs", type=positive_int, default=8, help="documents for the eviction part")
    p.add_argument("--out", default="msrnn_demo", help="folder for the plot and results (default ./msrnn_demo)")
    p.add_argument("--families", default=True, action=argparse.BooleanOptionalAction,
                   help="build SUPRA, BST and RMT from the model at one state budget, train each briefly and compare "
                        "all four families at equal state bytes (default on, ~2 min, cached; --no-families skips)")
    p.add_argument("--family-tokens", type=positive_int, default=40_960,
                   help="training tokens per built family (default 40960: 20 steps of 4 x 512)")
    p.add_argument("--family-budget", type=positive_int, default=262_144,
                   help="state bytes per sequence every family is sized to (default 262144)")
    add_seed(p)
    add_output_flags(p)
    p.set_defaults(func=run_demo)


INDUCTION_HALF = 256  # tokens of a held-out window that the induction check repeats


def induction_check(lm, docs: list[np.ndarray], half: int = INDUCTION_HALF, max_docs: int = 16) -> dict[str, float]:
    """PPL of a held-out window's first occurrence versus its exact repeat right after it."""
    from msrnn.evaluate import StreamEvalConfig, evaluate_stream

    windows = [np.concatenate([d[:half], d[:half]]) for d in docs if len(d) >= half][:max_docs]
    r = evaluate_stream(lm, windows, StreamEvalConfig(chunk_size=2 * half, max_tokens=None))
    s, c = r.nll_sum_by_pos, r.count_by_pos
    first = float(np.exp(s[1:half].sum() / c[1:half].sum()))
    second = float(np.exp(s[half:].sum() / c[half:].sum()))
    return {"windows": len(windows), "ppl_first_half": first, "ppl_repeat": second}


def kv_section(lm, docs, args, progress: bool) -> tuple[list[dict], dict]:
    """Full cache versus Window / Window+4 / H2O / TOVA at ``args.kv_budget`` slots on the same documents."""
    from msrnn.evaluate import StreamEvalConfig, evaluate_stream
    from msrnn.evaluate.plots import log_buckets
    from msrnn.kv import KVSettings, apply_kv

    length = 1024
    sel = [d.ids[:length] for d in docs if len(d.ids) >= length][: args.kv_docs] or [d.ids for d in docs[:1]]
    cfg = StreamEvalConfig(chunk_size=128, max_tokens=None)
    rows, curves = [], {}
    for name in ("full", "window", "sink", "h2o", "tova"):
        settings = KVSettings(name, None if name == "full" else args.kv_budget)
        r = evaluate_stream(apply_kv(lm, settings), sel, cfg, progress=progress)
        rows.append({"policy": settings.make_policy().describe() if name != "full" else "full", "ppl": r.ppl,
                     "peak_state_bytes": r.peak_state_bytes, "documents": len(sel), "tokens_per_doc": len(sel[0])})
        curves[rows[-1]["policy"]] = log_buckets(r)
    return rows, curves


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from msrnn.data.corpus import fingerprint, load_documents
    from msrnn.errors import ConfigError
    from msrnn.evaluate import StreamEvalConfig, evaluate_stream
    from msrnn.evaluate.documents import eval_documents
    from msrnn.evaluate.plots import log_buckets, plot_ppl_vs_position
    from msrnn.io import cache_dir, write_json
    from msrnn.models import load_lm
    from msrnn.provenance import stamped
    from msrnn.train import TrainConfig
    from msrnn.train.pretrain import PretrainConfig, pretrain
    from msrnn.ui import err_console, out_console, print_json, table

    if args.eval_tokens < INDUCTION_HALF or args.eval_tokens <= args.kv_budget:  # before training, not after
        raise ConfigError(f"--eval-tokens {args.eval_tokens} is too short: the induction check repeats a document's "
                          f"first {INDUCTION_HALF} tokens and the KV part needs documents longer than --kv-budget "
                          f"{args.kv_budget}; use --eval-tokens {max(INDUCTION_HALF, args.kv_budget + 1)} or more")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    data_fp = fingerprint(load_documents("stdlib:train"))
    # The packing is in the name: a model cached by a version that trained across document boundaries is not this one.
    model_dir = cache_dir() / "models" / (f"demo-{args.preset}-s{args.max_steps}-r{args.repeat_fraction:g}"
                                          f"-{PretrainConfig.packing}-seed{args.seed}-{data_fp}")
    trained_now = False
    if not (model_dir / "msrnn.json").exists():
        err_console.print(f"[bold]msrnn demo[/]: training the {args.preset} model ({args.max_steps} steps); "
                          f"cached at {model_dir}")
        pretrain(PretrainConfig(preset=args.preset, data="stdlib", val_batches=4, repeat_fraction=args.repeat_fraction),
                 TrainConfig(max_steps=args.max_steps, lr=2e-3, warmup_steps=30, eval_every=max(1, args.max_steps // 3),
                             save_every=100, seed=args.seed),
                 model_dir, resume=True, progress=not args.quiet)
        trained_now = True
    else:
        err_console.print(f"[bold]msrnn demo[/]: reusing the cached model at {model_dir}")
    lm = load_lm(model_dir)
    docs = eval_documents("stdlib:test", lm.tokenizer, max_tokens=args.eval_tokens, min_tokens=64)
    res = evaluate_stream(lm, [d.ids for d in docs], StreamEvalConfig(chunk_size=args.chunk_size, max_tokens=None),
                          progress=not (args.quiet or args.json))
    ind = induction_check(lm, [d.ids for d in docs])
    s, c = res.nll_sum_by_pos, res.count_by_pos
    trained_len = 512
    ppl_in = float(np.exp(s[:trained_len].sum() / max(1, c[:trained_len].sum())))
    ppl_out = float(np.exp(s[trained_len:].sum() / c[trained_len:].sum())) if c[trained_len:].sum() else None
    kv_rows, curves = kv_section(lm, docs, args, progress=not (args.quiet or args.json))
    out = Path(args.out)
    png = plot_ppl_vs_position({f"{args.preset}, full KV cache": log_buckets(res)}, out / "ppl_vs_position.png",
                               title=f"held-out stdlib code, {res.documents} documents (trained on 512-token windows)")
    kv_png = plot_ppl_vs_position(curves, out / "kv_eviction.png",
                                  title=f"the same {kv_rows[0]['documents']} documents, KV budget {args.kv_budget} "
                                        "slots per layer")
    fam = None
    if args.families:
        from msrnn.cli.demo_families import families_section

        fam = families_section(model_dir, args.family_tokens, out, progress=not (args.quiet or args.json),
                               budget=args.family_budget)
    wall = time.perf_counter() - t0
    summary = {
        "model_dir": str(model_dir), "trained_now": trained_now, "heldout_ppl": res.ppl,
        "heldout_ppl_within_512": ppl_in, "heldout_ppl_beyond_512": ppl_out, "tokens": res.tokens,
        "documents": res.documents, "peak_state_bytes": res.peak_state_bytes, "tokens_per_s": res.tokens_per_s,
        "induction": ind, "plot": str(png), "kv_plot": str(kv_png), "cache_dir": str(cache_dir()), "wall_seconds": wall,
        "buckets": res.buckets, "kv": kv_rows,
        "families": None if fam is None else {
            "report": str(Path(fam["folder"]) / "report.md"),
            "entries": [{k: e[k] for k in ("name", "family", "state_bytes", "ppl")} for e in fam["entries"]]},
    }
    write_json(out / "results.json", stamped(summary))
    if args.json:
        print_json(summary)
        return 0
    out_console.print(table("held-out perplexity by position (full KV cache)", ["positions", "tokens", "ppl"],
                            [(f"{b['start']}-{b['end']}", b["tokens"], b["ppl"]) for b in res.buckets]))
    rows = [("held-out ppl (all positions)", res.ppl), ("held-out ppl, positions < 512", ppl_in),
            ("held-out ppl, positions >= 512 (beyond training length)", ppl_out if ppl_out else "n/a"),
            ("ppl of a held-out window, first time", ind["ppl_first_half"]),
            ("ppl of the same window repeated (uses context)", ind["ppl_repeat"]),
            ("peak KV-cache bytes per sequence", res.peak_state_bytes), ("eval tokens/s", res.tokens_per_s),
            ("wall time (s)", wall)]
    out_console.print(table("msrnn demo", ["what", "value"], rows))
    out_console.print(table(f"bounded multi-state RNNs: {kv_rows[0]['documents']} held-out documents of "
                            f"{kv_rows[0]['tokens_per_doc']} tokens, token-by-token eviction",
                            ["policy", "ppl", "peak state bytes"],
                            [(r["policy"], r["ppl"], r["peak_state_bytes"]) for r in kv_rows]))
    if fam is not None:
        out_console.print(table(f"four families at {args.family_budget:,} state bytes (SUPRA, BST and RMT built "
                                f"from the model and trained on only {args.family_tokens:,} tokens each: this "
                                "shows the pipeline and the state sizes, the README has trained results)",
                                ["entry", "family", "state bytes", "ppl"],
                                [(e["name"], e["family"], e["state_bytes"], e["ppl"])
                                 for e in sorted(fam["entries"], key=lambda e: (e["state_bytes"], e["ppl"]))]))
        out_console.print(f"comparison report: {summary['families']['report']}")
    out_console.print(f"plots: {png}, {kv_png}\nresults: {out / 'results.json'}\nmodel (cached): {model_dir}\n"
                      f"cache folder: {cache_dir()}  (set MSRNN_CACHE to move it)")
    return 0
