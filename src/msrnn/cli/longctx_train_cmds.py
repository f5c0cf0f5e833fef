"""``msrnn train longctx``: fine-tune a model of any family on the long-context probes with a length curriculum."""

from __future__ import annotations

import argparse

from msrnn.cli.common import add_output_flags, emit, int_list, positive_int, seed_int
from msrnn.cli.training import add_run_folder_flags, add_scale_flags, check_out, summary, train_config


def add_train_longctx(ts: argparse._SubParsersAction) -> None:
    p = ts.add_parser("longctx", help="fine-tune any family's model on the long-context probes (length curriculum)",
                      description="Train --from (a plain decoder or a SUPRA / BST / RMT model) on passkey / needle / "
                                  "RULER-style probes: the loss of the true answer after each prompt, an equal share "
                                  "of steps at each of --lengths in order, haystack from --data's train split (msrnn "
                                  "eval longctx reads the test split with other seeds: held out).")
    p.add_argument("--from", dest="source", required=True, help="model directory of any family")
    p.add_argument("--tasks", default="passkey,niah_single", help="comma-separated probe tasks")
    p.add_argument("--lengths", default="256,512", help="the length curriculum in tokens, short to long")
    p.add_argument("--data", default="stdlib", help="haystack text (its train split; default stdlib docstrings)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--max-steps", type=positive_int, default=200)
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    add_scale_flags(p)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=100)
    add_run_folder_flags(p)
    p.add_argument("--seed", type=seed_int, default=0)
    add_output_flags(p)
    p.set_defaults(func=run_train_longctx, eval_every=0)


def run_train_longctx(args: argparse.Namespace) -> int:
    from msrnn.families import FAMILIES
    from msrnn.models.loading import family_of, load_tokenizer_for
    from msrnn.train.longctx import LongCtxTuneConfig, tune_longctx

    cfg = LongCtxTuneConfig(tasks=[t for t in args.tasks.split(",") if t.strip()],
                            lengths=int_list(args.lengths, "--lengths"), batch_size=args.batch_size, data=args.data)
    out = check_out(args)
    name = family_of(args.source)
    spec = FAMILIES.get(name)
    model = spec.load_trainable(args.source).train()  # on the CPU: the trainer's Accelerator places it per rank
    tokenizer = load_tokenizer_for(args.source)
    meta = {"family": spec.tuned_family or spec.name, "tuned_from": str(args.source)}
    trainer, result = tune_longctx(model, tokenizer, cfg, train_config(args), out, meta, resume=args.resume,
                                   progress=not (args.quiet or args.json))
    res = summary(out, trainer, result)
    # The trainer counts tokens at a fixed length per step, which the curriculum does not have: report the prompts'.
    res.pop("tokens", None)
    res.pop("tokens_per_s", None)
    res.update({"tasks": cfg.tasks, "lengths": cfg.lengths, "prompt_tokens": cfg.tokens(args.max_steps)})
    return emit(args, "train longctx", res)
