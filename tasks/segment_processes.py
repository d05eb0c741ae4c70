"""A segment trained by several processes, started from the Prefect segment task.

With ``processes_per_segment`` N > 1 the segment task does not train in its own process:
it runs ``loraflow segment ... --nproc-per-node N`` (:mod:`flows.cli.launch`, loraflow's
own launcher, not torchrun) as a child, so a multi-GPU worker trains one segment on all
its GPUs through the very code path a person uses at the terminal. The child gets the
same input checkpoint, output folder, budget and data / cache roots as the in-process
path, and hands back its result the way the CLI always does: one JSON line on stdout
(rank 0's ``SegmentResult``), never parsed from log lines.

What the in-process path guarantees still holds:

- **Retries.** A child that fails (any exit code but 0 and 5) fails the task; Prefect
  retries it from the same input checkpoint. Bad input (exit code 2) is raised as a
  :class:`~engine.errors.LoraflowError` with that code, so it is not retried.
- **Stopping.** Whatever ends the wait (Prefect's timeout backstop, a cancellation,
  which Prefect turns into ``TerminationSignal``, Ctrl-C) first sends SIGTERM to the
  child's process group: the ranks commit at the next step and exit 5, or are killed
  after :data:`STOP_GRACE_SECONDS`; then the exception goes on. If this process dies
  without a word (kill -9), Linux sends the child SIGTERM (``PR_SET_PDEATHSIG``): no
  orphan trains on.
- **The time box** counts from the launch (``LORAFLOW_SEGMENT_STARTED_AT``), so the
  children's start-up is inside the budget, as for ``loraflow segment``.

Progress: the children's stderr lines (rank 0's log lines among them) are forwarded to
the task run's logger, so they reach the Prefect UI.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pydantic import TypeAdapter

from engine.errors import BudgetTooShortError, ConfigurationError, ExitCode, LoraflowError
from engine.store.storage import StorageError
from engine.train.options import SegmentResult
from flows.cli.launch import STARTED_AT_ENV

#: How long the ranks get to commit and exit after SIGTERM before they are killed (the
#: launcher passes the signal on and never kills a stopping rank itself: this task decides).
STOP_GRACE_SECONDS = 60.0
#: How often the wait wakes up, so Prefect's timeout and signals land promptly.
POLL_SECONDS = 0.5
#: torchrun's and loraflow's own process variables: a child must start its own world.
_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", STARTED_AT_ENV)
#: ``%(asctime)s %(levelname)s %(name)s: %(message)s`` (flows/cli/main.py): the level.
_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
_PR_SET_PDEATHSIG = 1


class SegmentProcessesFailed(RuntimeError):
    """The processes training a segment failed (not the user's input): retried."""


def checked_processes(processes: int | None) -> int | None:
    """``processes_per_segment`` as the segment request carries it: None for one process.

    1 is one process too (None, so the request keeps the shape it always had); fewer
    than 1 is refused, naming the parameter.
    """
    if processes is None:
        return None
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigurationError(
            f"processes_per_segment must be a whole number of 1 or more, not {processes!r}")
    return processes if processes > 1 else None


def segment_command(task_file: str, out_dir: str, processes: int, *, checkpoint: str | None,
                    budget_seconds: float | None, data_dir: str | None,
                    cache_root: str) -> list[str]:
    """The ``loraflow segment`` command line that trains what the in-process task would:
    no validation images (the flow renders them at the end), no progress bar."""
    command = [sys.executable, "-m", "flows.cli", "segment", task_file, "--output-dir", out_dir,
               "--cache-dir", cache_root, "--no-validation", "-q",
               "--nproc-per-node", str(processes)]
    if checkpoint is not None:
        command += ["--checkpoint", checkpoint]
    if budget_seconds is not None:
        command += ["--budget-seconds", repr(budget_seconds)]
    if data_dir is not None:
        command += ["--data-dir", data_dir]
    return command


def child_environment(started: float) -> dict[str, str]:
    """This process's environment, less any torchrun world, with the repository
    importable and the launch time the ranks' time box counts from."""
    env = {k: v for k, v in os.environ.items() if k not in _WORLD_ENV}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env[STARTED_AT_ENV] = repr(started)
    return env


def _find_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the explicit stop still works
        return None


_prctl = _find_prctl()  # looked up here: the child may not import (a lock) between fork and exec


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def forward_lines(stream: IO[str], logger: Any, tail: list[str]) -> None:
    """Each line of ``stream`` to ``logger`` at the level it names (INFO otherwise); the
    last lines are kept in ``tail`` for the error message of a failure."""
    for raw in stream:
        line = raw.rstrip("\n")
        if not line:
            continue
        match = _LEVEL.match(line)
        level = getattr(logging, match.group(1)) if match else (
            logging.ERROR if line.startswith("error:") else logging.INFO)
        with contextlib.suppress(Exception):  # logging must never break training
            logger.log(level, "[segment] %s", line)
        tail.append(line)
        del tail[:-20]


def stop_group(process: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the child's process group; SIGKILL it if it has not exited after ``grace``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def wait_for_exit(process: subprocess.Popen, poll: float = POLL_SECONDS) -> int:
    """The child's exit code, waking every ``poll`` s so an exception raised into this
    thread (Prefect's timeout, a termination signal) is not held up; on any such
    exception the child group is stopped first (:func:`stop_group`), then it goes on."""
    try:
        while True:
            try:
                return process.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        stop_group(process)
        raise


def parse_result(stdout: str) -> SegmentResult:
    """Rank 0's summary: the last line ``loraflow segment`` printed on stdout."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise SegmentProcessesFailed("the segment's processes printed no summary")
    return TypeAdapter(SegmentResult).validate_json(lines[-1])


def failure(code: int, tail: list[str]) -> Exception:
    """The error a child's exit ``code`` means: bad input, a short budget and storage keep
    their loraflow error (and exit code); anything else is a failure to retry."""
    said = next((line[len("error:"):].strip() for line in reversed(tail)
                 if line.startswith("error:")), "")
    last = "\n".join(tail[-5:])
    if code == ExitCode.BAD_INPUT:
        return LoraflowError(said or last)
    if code == ExitCode.BUDGET_TOO_SHORT:
        return BudgetTooShortError(said or last)
    if code == ExitCode.STORAGE:
        return StorageError(said or last)
    return SegmentProcessesFailed(
        f"the segment's processes exited with code {code}: {said or last or 'no output'}")


def train_in_processes(task_json: str, out_dir: str, processes: int, logger: Any, *,
                       checkpoint: str | None, budget_seconds: float | None,
                       data_dir: str | None, cache_root: str,
                       on_start: Callable[[subprocess.Popen], None] | None = None,
                       ) -> SegmentResult:
    """Train one segment with ``loraflow segment --nproc-per-node processes``; its result.

    ``task_json`` is the task definition, written to a private temporary file for the
    child's command line and removed afterwards. Exit 5 (the ranks were sent a stop
    signal by someone else and committed) returns the committed result, as a budget
    stop does. ``on_start`` is handed the child (for a test that signals it).
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraflow-segment-") as folder:
        task_file = Path(folder, "task.json")
        task_file.touch(mode=0o600)
        task_file.write_text(task_json)
        command = segment_command(str(task_file), out_dir, processes, checkpoint=checkpoint,
                                  budget_seconds=budget_seconds, data_dir=data_dir,
                                  cache_root=cache_root)
        logger.info("training this segment with %d processes (loraflow segment "
                    "--nproc-per-node %d)", processes, processes)
        tail: list[str] = []
        with open(Path(folder, "stdout"), "w+") as stdout:
            process = subprocess.Popen(
                command, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                text=True, env=child_environment(started), start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            reader = threading.Thread(target=forward_lines, args=(process.stderr, logger, tail),
                                      name="segment-stderr", daemon=True)
            reader.start()
            if on_start is not None:
                on_start(process)
            code = wait_for_exit(process)
            reader.join(timeout=10)  # a grandchild holding stderr must not hang the task
            stdout.seek(0)
            printed = stdout.read()
    if code not in (ExitCode.OK, ExitCode.INTERRUPTED):
        raise failure(code, tail)
    result = parse_result(printed)
    if code == ExitCode.INTERRUPTED:
        logger.warning("the segment's processes were stopped by a signal; they committed "
                       "step %d", result.global_step)
    return result
