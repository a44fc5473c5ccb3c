"""`duo` command: one sub-command per module in this package; each module is thin over the library."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import warnings

from duo.errors import UserError

# Refusals of the disk a user fixes (free space, a writable folder), not bugs: a message and exit 2, no traceback.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
RERUN = "then rerun the same command: what was finished is kept and it resumes (train: with --resume)."

# Each module defines add_parser(subparsers) and sets `func` on its parser.
COMMANDS = [
    "curate",
    "train",
    "sample",
    "attack",
    "evaluate",
    "sweep",
    "tune",
    "benchmark",
    "export",
    "card",
    "report",
    "demo",
    "shapes",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo",
        description="Remove a concept from a text-to-image diffusion model with DUO, attack it, measure it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"duo.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"duo.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def quiet_libraries() -> None:
    """Our own progress bars and messages are what a user should read, not the libraries' chatter."""
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def disk_error(exc: Exception) -> str | None:
    """The message for an OSError the user can fix, or None for any other (a bug: let its traceback show)."""
    if not isinstance(exc, OSError):  # another library's error around one (safetensors: '(os error 28)')
        from duo.data.files import os_error

        exc = os_error(exc, None)
        if exc is None:
            return None
    where = f" '{exc.filename}'" if exc.filename else ""
    if exc.errno in DISK_FULL:
        return (
            f"the disk is full: writing{where} failed ({exc.strerror}). Free space there, or choose an --out on "
            f"another disk, {RERUN}"
        )
    if exc.errno in NOT_WRITABLE:
        return (
            f"cannot write{where} ({exc.strerror}): the folder is read-only or not yours. Make it writable, or choose "
            f"another --out (an input: make it readable), {RERUN}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)  # --help ends here, before torch or diffusers are imported
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    quiet_libraries()
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        message = disk_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished items are kept and a rerun resumes.", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
