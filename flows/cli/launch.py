"""``loraflow segment --nproc-per-node N``: one segment trained by N processes here.

The launcher starts N copies of the same ``loraflow segment`` command line, less the
``--nproc-per-node`` option, each with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on localhost): each copy trains its
share of every step (:mod:`engine.train.distributed`); rank 0 alone writes the
checkpoint and prints the summary. ``torchrun`` or ``accelerate launch`` can start the
same command directly (docs/distributed.md).

It starts them itself rather than through ``torch.distributed.run`` because a segment
must end on a signal the way a single process does, and torchrun's agent does not: it
turns SIGTERM/SIGINT into an exception that loses the ranks' exit codes (a signal
landing after the ranks finished still reported "stopped by signal"), SIGKILLs ranks
still committing 30 s later, and leaves its ranks training on as orphans when it is
killed -9 itself (all three seen in tests/flows/test_cli_launch.py). Here:

- **A signal** (SIGTERM, SIGINT) to the launcher is passed on once to every rank, each
  in its own session (so a terminal's Ctrl-C reaches them only through the launcher,
  never twice); they agree on the stop, rank 0 commits, all exit 5. A second signal is
  passed on too: the ranks then stop at once, as a single process does. The launcher
  never kills a rank that is stopping: whoever sent the signal decides how long to wait.
- **The launcher dying** (kill -9): each rank sees it has lost its parent and sends
  itself one SIGTERM (:func:`engine.train.distributed.stop_when_orphaned`): they commit
  at the next step and exit; no orphan trains on. (Not ``PR_SET_PDEATHSIG``: it fires
  once per exiting thread of a multi-threaded parent, and a second SIGTERM makes a rank
  stop without committing; seen in the test.)
- **A rank failing** (any exit but 0 and 5) leaves the others waiting at a collective:
  they are sent SIGTERM, then killed :data:`FAILURE_GRACE_SECONDS` later.
- **The exit code** is the first failing rank's (a rank killed by a signal: 1), else
  rank 0's: 5 only when the ranks did stop on the signal, 0 when they had finished. A
  rank ended by the very signal the launcher passed on, before it could handle it (it was
  still starting up), is no failure: nothing was trained or committed, and the launcher
  exits 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), what a shell reports
  for a single-process segment the signal ends during its start-up.

The task is validated here first, and its model and dataset made ready
(:func:`prepare_shared_inputs`), so bad input is refused once, before any process starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from engine.errors import ExitCode

log = logging.getLogger(__name__)

#: When the launching process began (``time.monotonic``, which every process on this
#: machine shares): the ranks' time box counts the launcher's start-up too.
STARTED_AT_ENV = "LORAFLOW_SEGMENT_STARTED_AT"
OPTION = "--nproc-per-node"
#: A rank's exit codes that are no failure: the segment's end, and its signal stop.
RANK_DONE = (ExitCode.OK, ExitCode.INTERRUPTED)
#: How long ranks get to exit after another rank failed, before they are killed (they
#: wait at a collective that can no longer complete; nothing is left to commit).
FAILURE_GRACE_SECONDS = 10.0
#: How often the launcher looks at its ranks (signals are handled at once regardless).
POLL_SECONDS = 0.1
#: What the launcher passes on to its ranks (a segment's stop signals).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(OPTION, type=positive_int, default=1, metavar="N",
                        help="train the segment with N processes on this machine (one per "
                             "GPU; gloo on CPU), each given torchrun's environment; the task's "
                             "batch is the global batch, split among them")


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


# -- the ranks ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on localhost now, for rank 0's rendezvous store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, size: int, port: int, started: float) -> dict[str, str]:
    """This process's environment plus the world torchrun would give rank ``rank``.

    One compute thread per rank unless ``OMP_NUM_THREADS`` is set, as torchrun does (N
    ranks share the cores; the thread count is part of the bits on a CPU). The
    launcher's id lets each rank stop when the launcher dies
    (:func:`engine.train.distributed.stop_when_orphaned`).
    """
    from engine.train.distributed import LAUNCHER_PID_ENV

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault(STARTED_AT_ENV, repr(started))
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
               LOCAL_WORLD_SIZE=str(size), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), **{LAUNCHER_PID_ENV: str(os.getpid())})
    return env


class Ranks:
    """The running rank processes: started, signalled, waited for, stopped on a failure."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self.passed_on: set[int] = set()  # the signals passed on to the ranks
        self.first_failure: int | None = None  # the rank that failed first, on its own

    def start(self, argv: list[str], size: int, started: float) -> None:
        port = free_port()
        command = [sys.executable, "-u", "-m", "flows.cli", *argv]
        for rank in range(size):
            self.processes.append(subprocess.Popen(
                command, env=rank_environment(rank, size, port, started),
                start_new_session=True))

    def pass_on(self, signum: int, frame: Any) -> None:
        """The launcher's SIGTERM/SIGINT handler: the same signal to every live rank."""
        self.passed_on.add(signum)
        log.warning("signal %d: passed on to the %d ranks (they commit at the next step)",
                    signum, len(self.processes))
        for process in self.processes:
            self._send(process, signum)

    def wait(self) -> list[int]:
        """Wait until every rank has exited; their exit codes, by rank."""
        while (codes := [p.poll() for p in self.processes]).count(None):
            failed = [r for r, c in enumerate(codes) if c not in (None, *RANK_DONE)]
            if failed and self.first_failure is None:
                self.first_failure = failed[0]
                self._stop_after_failure(failed[0], codes[failed[0]])
            time.sleep(POLL_SECONDS)
        return codes

    def ended_by_passed_signal(self, code: int | None) -> bool:
        """Whether a rank's exit ``code`` says a signal passed on ended it, unhandled: the
        rank was still starting (a running segment handles both stop signals)."""
        return code is not None and code < 0 and -code in self.passed_on

    def _stop_after_failure(self, rank: int, code: int | None) -> None:
        if self.ended_by_passed_signal(code):
            log.warning("rank %d was ended by signal %d before it could handle it (still "
                        "starting): stopping the others", rank, -code)
        else:
            log.warning("rank %d exited with %s: stopping the others", rank, code)
        for process in self.processes:
            self._send(process, signal.SIGTERM)
        deadline = time.monotonic() + FAILURE_GRACE_SECONDS
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.poll() is None:
                log.warning("rank process %d did not stop: killed", process.pid)
                process.kill()

    @staticmethod
    def _send(process: subprocess.Popen, signum: int) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def kill_all(self) -> None:
        """Kill what still runs (the launcher itself is failing: no rank may outlive it)."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def exit_code(codes: list[int], first_failure: int | None,
              passed_on: set[int] | frozenset[int] = frozenset()) -> int:
    """The segment's exit code from its ranks' (see the module docstring); ``passed_on``:
    the signals the launcher passed on to them."""
    code = codes[first_failure] if first_failure is not None else codes[0]
    if code >= 0:
        return code
    if -code in passed_on:  # ended by the signal passed on, before handling it
        return 128 - code
    return ExitCode.FAILED  # killed by another signal: a failure


def prepare_shared_inputs(task: Any, data_dir: str | None) -> None:
    """Build here, once, what every rank would otherwise build at the same moment in the
    same place: an embedded model, the prepared (captioned, class) dataset.

    Ranks that did it together collided (seen on a fresh ``LORAFLOW_HOME``: one rank's
    half-written dataset file moved under the other's feet, a model folder read while the
    other built it). The ranks then find both ready, as a second segment does. A problem
    with the data is reported here, once, before any process starts.
    """
    from engine.data.prepared import load_dataset_for_task
    from engine.model.loading import resolve_model_location

    resolve_model_location(task.model)
    load_dataset_for_task(task, data_dir)


def launch_segment(args: argparse.Namespace, started: float, task: Any = None) -> int:
    """Run ``args``' segment command in ``args.nproc_per_node`` processes; its exit code.

    ``task`` (the validated task): its model and dataset are made ready first.
    """
    nproc = args.nproc_per_node
    if task is not None:
        prepare_shared_inputs(task, args.data_dir)
    ranks = Ranks()
    previous = {sig: signal.signal(sig, ranks.pass_on) for sig in STOP_SIGNALS}
    log.info("launching %d processes for this segment", nproc)
    try:
        ranks.start(child_argv(args.argv), nproc, started)
        codes = ranks.wait()
    except BaseException:
        ranks.kill_all()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = exit_code(codes, ranks.first_failure, ranks.passed_on)
    if ranks.passed_on and code == ExitCode.INTERRUPTED:
        log.warning("stopped by signal: the ranks committed at the same step")
    elif any(map(ranks.ended_by_passed_signal, codes)):  # all may end between two polls
        log.warning("stopped by signal while the ranks were starting: nothing trained or "
                    "committed (any checkpoint given is untouched)")
    return code
