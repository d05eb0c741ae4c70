"""``loraflow``: the parser, logging set-up, and the one mapping of errors to exit codes.

Every error a user can fix is a :class:`~engine.errors.LoraflowError` that carries its
exit code (:class:`~engine.errors.ExitCode`): :func:`main` prints its message as one
``error:`` line and exits with that code, whichever command raised it. Only bugs show a
traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import logging
import sys

from flows.cli import bench, lora, models, serve, train

#: The command groups, in the order ``loraflow --help`` lists them.
GROUPS = (train, serve, lora, models, bench)
#: Chatty at INFO, and nothing in them a user acts on.
NOISY_LOGGERS = ("httpx", "urllib3", "botocore", "s3fs", "aiobotocore", "fsspec")
INTERRUPTED_BY_USER = 130  # the shell's code for SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraflow",
        description="Fine-tune Stable Diffusion LoRA adapters in time-boxed, resumable segments.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(subparsers)
    return parser


def configure_logging(verbose: bool) -> None:
    """Log lines on stderr (stdout is for results); DEBUG with ``-v``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        from engine.logs import quiet_libraries

        quiet_libraries()


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code."""
    from engine.errors import LoraflowError

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except LoraflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_BY_USER


if __name__ == "__main__":
    sys.exit(main())
