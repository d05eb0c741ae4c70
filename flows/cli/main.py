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

from engine.errors import ExitCode
from flows.cli import bench, caption, demo, lora, models, serve, train, verify

#: The command groups, in the order ``loraflow --help`` lists them.
GROUPS = (train, caption, verify, serve, lora, demo, models, bench)
#: Chatty at INFO, and nothing in them a user acts on.
NOISY_LOGGERS = ("httpx", "urllib3", "botocore", "s3fs", "aiobotocore", "fsspec")
INTERRUPTED_BY_USER = 130  # the shell's code for SIGINT
ENDED_BY_SIGTERM = 143  # the shell's code for a process SIGTERM ended


#: What each exit code means, for ``loraflow --help`` (a test keeps it complete).
EXIT_CODE_MEANINGS = (
    (ExitCode.OK, "success"),
    (ExitCode.FAILED, "unexpected error, a bug: the traceback is printed"),
    (ExitCode.BAD_INPUT, "bad input: task, override, dataset, model or checkpoint refused"),
    (ExitCode.BUDGET_TOO_SHORT, "the time budget cannot fit one step and a checkpoint"),
    (ExitCode.STORAGE, "storage unreachable or full after retries"),
    (ExitCode.INTERRUPTED, "stopped by SIGTERM/SIGINT after committing a checkpoint"),
    (ExitCode.NOT_VERIFIED, "verify: a replayed step differs from the segment's digest trail"),
    (INTERRUPTED_BY_USER, "interrupted by Ctrl-C (segment: the second one), not committed"),
    (ENDED_BY_SIGTERM, "SIGTERM during start-up, before any step: nothing committed"),
)
EXAMPLES = """\
first run (a tiny model and demo data, built locally):
  loraflow run examples/quickstart.json --output-dir runs/quickstart
change a field without editing the file:
  loraflow run task.json train_args.learning_rate=5e-5 lora.rank=16 --output-dir runs/x
"""


def version() -> str:
    """The installed package's version (``pip install -e .`` installs it)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("loraflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODE_MEANINGS)
    return f"{EXAMPLES}\nexit codes:\n{codes}\n\n'loraflow COMMAND --help' shows an example."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraflow",
        description="Fine-tune Stable Diffusion LoRA adapters in time-boxed, resumable segments.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"loraflow {version()}")
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


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, except that ``KEY.PATH=VALUE`` overrides may also follow the options
    (``run task.json --output-dir x lora.rank=8``): argparse alone takes them only right
    after the task file."""
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra and (late != extra or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def keep_torch_caches_in_loraflow_home() -> None:
    """Point torch's compile cache (``torchinductor_<user>``, which importing diffusers or
    peft creates in the temporary directory) into ``$LORAFLOW_HOME``, unless it is set.

    A worker's temporary directory then holds nothing loraflow made once a command ends,
    and a later ``torch.compile`` finds its cache again.
    """
    import os

    from engine.model.embedded.registry import loraflow_home

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(loraflow_home() / "torchinductor"))


def exit_at_once(code: int) -> None:
    """End the process now, skipping the interpreter's teardown of torch and diffusers.

    Used by commands whose work is committed when they return (``segment``: its
    checkpoint and summary are written, its data-loader workers and TensorBoard writer
    closed): tearing down the loaded modules adds ~1.4 s to every process (measured on 2
    cores), which a run of many short segments pays each time. Output is flushed first.
    """
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code."""
    from engine.errors import LoraflowError

    keep_torch_caches_in_loraflow_home()
    args = parse_arguments(build_parser(), argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # a launcher repeats it
    configure_logging(args.verbose)
    try:
        code = args.func(args)
        if argv is None and getattr(args, "exit_at_once", False):
            exit_at_once(code)
        return code
    except LoraflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_BY_USER


if __name__ == "__main__":
    sys.exit(main())
