"""The ``msrnn`` command line. Every command has ``--help``, progress on stderr and ``--json`` on stdout."""

from __future__ import annotations

import argparse
import sys

from msrnn import __version__


def build_parser() -> argparse.ArgumentParser:
    from msrnn.cli import (
        bench_cmds,
        bst_cmds,
        compare_cmds,
        demo,
        doctor_cmds,
        eval_cmds,
        kv_cmds,
        rmt_cmds,
        supra_cmds,
        task_cmds,
        train_cmds,
    )

    p = argparse.ArgumentParser(prog="msrnn", description="Transformers as bounded-state recurrent models.")
    p.add_argument("--version", action="version", version=f"msrnn {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_demo(sub)
    train_cmds.add_tokenizer(sub)
    train_cmds.add_pretrain(sub)
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval_cmd", required=True, metavar="KIND")
    eval_cmds.add_eval_ppl(ev)
    task_cmds.add_eval_task(ev)
    eval_cmds.add_eval_harness(ev)
    eval_cmds.add_generate(sub)
    kv_cmds.add_kv(sub)
    supra_cmds.add_convert(sub)
    ts = sub.add_parser("train", help="train or uptrain a family's model").add_subparsers(
        dest="train_cmd", required=True, metavar="FAMILY")
    supra_cmds.add_train_supra(ts)
    rmt_cmds.add_train_rmt(ts)
    bst_cmds.add_train_bst(ts)
    bench_cmds.add_bench(sub)
    compare_cmds.add_compare(sub)
    doctor_cmds.add_doctor(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from msrnn.cli.common import check_output_paths, setup_logging
    from msrnn.compat import check_transformers_version
    from msrnn.errors import MsrnnError

    try:
        check_transformers_version()  # before any command imports a family: a clean error, no traceback
    except MsrnnError as exc:
        print(f"msrnn: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        check_output_paths(args)
        return int(args.func(args) or 0)
    except MsrnnError as exc:
        print(f"msrnn: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"msrnn: error: {exc.filename or exc} does not exist; check the path", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable folder, a file where a folder was expected, a full disk, ...
        target = exc.filename2 if isinstance(exc, IsADirectoryError) and exc.filename2 else exc.filename
        what = f"cannot use {target}" if target else "a file operation failed"
        print(f"msrnn: error: {what}: {exc.strerror or exc}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msrnn: interrupted (checkpoints already written are intact; rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
