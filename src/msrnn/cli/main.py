"""The ``msrnn`` command line. Every command has ``--help``, progress on stderr and ``--json`` on stdout."""

from __future__ import annotations

import argparse
import sys

from msrnn.version import __version__


def build_parser() -> argparse.ArgumentParser:
    from msrnn.cli import (
        bench_cmds,
        bst_cmds,
        compare_cmds,
        demo,
        doctor_cmds,
        eval_cmds,
        kv_cmds,
        longctx_cmds,
        longctx_train_cmds,
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
    longctx_cmds.add_eval_longctx(ev)
    eval_cmds.add_eval_harness(ev)
    eval_cmds.add_generate(sub)
    longctx_cmds.add_ask(sub)
    kv_cmds.add_kv(sub)
    supra_cmds.add_convert(sub)
    ts = sub.add_parser("train", help="train or uptrain a family's model").add_subparsers(
        dest="train_cmd", required=True, metavar="FAMILY")
    supra_cmds.add_train_supra(ts)
    rmt_cmds.add_train_rmt(ts)
    bst_cmds.add_train_bst(ts)
    longctx_train_cmds.add_train_longctx(ts)
    bench_cmds.add_bench(sub)
    compare_cmds.add_compare(sub)
    doctor_cmds.add_doctor(sub)
    return p


_DISK_FULL = ("No space left on device", "StorageFull", "file write failed", "Errno 28", "code: 28")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or torch's / safetensors' own writer errors) means the disk filled up."""
    return getattr(exc, "errno", None) == 28 or any(sign in str(exc) for sign in _DISK_FULL)


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
    from msrnn.provenance import start

    start(sys.argv[1:] if argv is None else list(argv))
    setup_logging(args.verbose)
    try:
        from msrnn.ui import check_launch_env

        check_launch_env()
        check_output_paths(args)
        return int(args.func(args) or 0)
    except MsrnnError as exc:
        print(f"msrnn: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"msrnn: error: {exc.filename or exc} does not exist; check the path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = getattr(args, "resume", None) is not None
        print("msrnn: interrupted" + (" (checkpoints already written are intact; rerun with --resume)" if resumable
                                      else "; nothing was written"), file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, never a traceback (-v shows it)
        rerun = " with --resume" if getattr(args, "resume", None) is not None else ""
        if isinstance(exc, OSError):  # an unwritable folder, a file where a folder was expected, a full disk, ...
            target = exc.filename2 if isinstance(exc, IsADirectoryError) and exc.filename2 else exc.filename
            what = f"cannot use {target}" if target else "a file operation failed"
            hint = (f"the disk is full: free some space and rerun{rerun}" if disk_full(exc)
                    else "check the path and its permissions")
            print(f"msrnn: error: {what}: {exc.strerror or exc}; {hint}", file=sys.stderr)
            return 2
        if disk_full(exc):  # torch's and safetensors' writers raise their own types for ENOSPC
            print("msrnn: error: the disk is full; nothing half-written was kept (what was complete before is intact). "
                  f"Free some space and rerun{rerun}", file=sys.stderr)
            return 2
        if args.verbose:
            import traceback

            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"msrnn: error: internal error, {type(exc).__name__}: {first} (this is a bug in msrnn or a library it "
              "uses; rerun with -v for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
