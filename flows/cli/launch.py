"""``loraflow segment --nproc-per-node N``: one segment trained by N processes here.

The command starts torchrun (``torch.distributed.run``, standalone: one machine, a free
port) with N copies of the same ``loraflow segment`` command line, less the
``--nproc-per-node`` option. Each copy reads its rank from torchrun's environment and
trains its share of every step (:mod:`engine.train.distributed`); rank 0 alone writes
the checkpoint and prints the summary. ``torchrun`` or ``accelerate launch`` can start
the same command directly (docs/distributed.md).

The task is validated here first, so bad input is refused once, before any process
starts. The exit code is the one the ranks exit with (all stop together, so they agree).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from engine.errors import ExitCode

log = logging.getLogger(__name__)

#: When the launching process began (``time.monotonic``, which every process on this
#: machine shares): the ranks' time box counts the launcher's start-up too.
STARTED_AT_ENV = "LORAFLOW_SEGMENT_STARTED_AT"
OPTION = "--nproc-per-node"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(OPTION, type=positive_int, default=1, metavar="N",
                        help="train the segment with N processes on this machine (one per "
                             "GPU; gloo on CPU), launched through torchrun; the task's batch "
                             "is the global batch, split among them")


def launch_wanted(args: argparse.Namespace) -> bool:
    """Whether this process must launch the ranks (not already one of them)."""
    return getattr(args, "nproc_per_node", 1) > 1 and "WORLD_SIZE" not in os.environ


def child_argv(argv: list[str]) -> list[str]:
    """``argv`` without the ``--nproc-per-node N`` (or ``=N``) option."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == OPTION:
            skip = True
        elif not arg.startswith(OPTION + "="):
            out.append(arg)
    return out


def started_at(default: float) -> float:
    """The segment's start: the launcher's, when this process is one of its ranks."""
    text = os.environ.get(STARTED_AT_ENV)
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if value <= time.monotonic() else default


def launch_segment(args: argparse.Namespace, started: float) -> int:
    """Run ``args``' segment command in ``args.nproc_per_node`` processes; their exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    nproc = args.nproc_per_node
    config = get_args_parser().parse_args([
        "--standalone", f"--nproc-per-node={nproc}", "--module", "flows.cli",
        *child_argv(args.argv),
    ])
    os.environ.setdefault(STARTED_AT_ENV, repr(started))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    log.info("launching %d processes for this segment (torchrun, standalone)", nproc)
    try:
        run(config)
    except ChildFailedError as exc:
        return _exit_code(exc)
    except SignalException as exc:  # the ranks were sent the signal and stopped
        log.warning("stopped by signal %s", exc.sigval)
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _exit_code(exc: Any) -> int:
    """Rank 0's exit code when it failed, else the first failure's."""
    failures = exc.failures
    failure = failures.get(0) or exc.get_first_failure()[1]
    code = int(failure.exitcode)
    return code if code > 0 else ExitCode.FAILED  # negative: killed by a signal
