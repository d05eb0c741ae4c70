"""Live progress of a segment on the console: one line per step, fed by ``on_step``.

Before, nothing was printed during a segment: tens of seconds of silence. The bar
shows the whole training's steps with the last step's loss, learning rate and
samples/s; it only reads the :class:`~engine.train.options.StepReport`, so it cannot
change a bit of training. On a terminal it is a tqdm bar redrawn in place; into a file
or a pipe (a worker's log, CI) it is a plain line every :data:`PLAIN_LINE_SECONDS` and
at the segment's last step, so a log is not flooded with carriage returns.

Prefect-free: ``loraflow segment`` draws it in a process without Prefect, and the
``train-segment`` task draws it in the process the task runs in. ``LORAFLOW_QUIET=1``
(what ``--quiet`` sets) turns it off.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from engine.train.options import StepCallback, StepReport

log = logging.getLogger(__name__)

#: Set to 1 (``loraflow run --quiet``, ``segment --quiet``, or a worker's environment):
#: no progress on the console.
QUIET_ENV = "LORAFLOW_QUIET"
#: How often a plain (not a terminal) progress line is written, at most.
PLAIN_LINE_SECONDS = 10.0
#: tqdm's bar without its own rate (the step's samples/s is in the postfix).
BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
              "[{elapsed}<{remaining}{postfix}]")


def console_progress_wanted() -> bool:
    """False when ``LORAFLOW_QUIET`` is set to a true value."""
    return os.environ.get(QUIET_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def describe_step(report: StepReport) -> str:
    """``loss 0.1234, lr 1.00e-04, 3.21 samples/s``: the numbers a person watches."""
    return (f"loss {report.loss:.4f}, lr {report.lr:.2e}, "
            f"{report.samples_per_second:.2f} samples/s")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class StepBar:
    """An ``on_step`` callback that shows each step on ``stream`` (stderr by default).

    Never raises into the training loop (an exception from ``on_step`` would end the
    segment): a display that fails is switched off with one warning.
    """

    def __init__(self, stream: TextIO | None = None, *,
                 every_seconds: float = PLAIN_LINE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.terminal = _is_terminal(self.stream)
        self.every_seconds = every_seconds
        self.clock = clock
        self._bar: Any = None
        self._last_line: float | None = None
        self._broken = False

    def __call__(self, report: StepReport) -> None:
        if self._broken:
            return
        try:
            if self.terminal:
                self._draw(report)
            else:
                self._line(report)
        except Exception as exc:  # noqa: BLE001 - a display must never stop training
            self._broken = True
            log.warning("progress display switched off: %s", exc)

    def _draw(self, report: StepReport) -> None:
        if self._bar is None:  # from the first step seen: tqdm times the steps after it
            from tqdm import tqdm

            self._bar = tqdm(total=report.total_steps, initial=report.global_step,
                             desc="training", unit="step", file=self.stream,
                             dynamic_ncols=True, leave=True, bar_format=BAR_FORMAT,
                             postfix=describe_step(report))
        self._bar.set_postfix_str(describe_step(report), refresh=False)
        if report.global_step > self._bar.n:
            self._bar.update(report.global_step - self._bar.n)
        else:
            self._bar.refresh()

    def _line(self, report: StepReport) -> None:
        now = self.clock()
        last_of_segment = report.global_step >= report.end_step
        due = self._last_line is None or now - self._last_line >= self.every_seconds
        if not (due or last_of_segment):
            return
        self._last_line = now
        share = 100.0 * report.global_step / max(report.total_steps, 1)
        self.stream.write(f"step {report.global_step}/{report.total_steps} ({share:.0f}%) "
                          f"{describe_step(report)}, {report.elapsed:.1f} s\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar (a terminal keeps its last state); harmless if nothing was drawn."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def all_of(*callbacks: StepCallback | None) -> StepCallback | None:
    """One ``on_step`` that calls each given callback in order (None if none is given)."""
    chosen = [c for c in callbacks if c is not None]
    if not chosen:
        return None
    if len(chosen) == 1:
        return chosen[0]

    def each(report: StepReport) -> None:
        for callback in chosen:
            callback(report)

    return each
