"""Where a segment's fixed cost goes: named phases, timed only when someone is listening.

Why: what a process does before its first step and after its last is paid once per
segment, and a run of many short segments pays it many times. ``loraflow bench
--fixed-cost`` (:mod:`engine.bench.fixed_cost`) times a cold ``loraflow segment`` process
phase by phase; the phases are marked here, in the code that does the work, so the
breakdown times exactly what a segment runs and cannot drift from it.

Outside :func:`recording` a phase costs one context-variable read: nothing is kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class PhaseLog:
    """Phases in the order they ran: (name, seconds); a name that runs twice adds up."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


_listening: ContextVar[PhaseLog | None] = ContextVar("loraflow_phases", default=None)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as ``name`` if a :func:`recording` is open; else do nothing."""
    log = _listening.get()
    if log is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        log.add(name, time.perf_counter() - started)


@contextmanager
def recording() -> Iterator[PhaseLog]:
    """Collect the phases run inside the block."""
    log = PhaseLog()
    token = _listening.set(log)
    try:
        yield log
    finally:
        _listening.reset(token)
