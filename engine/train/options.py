"""A segment's seam: how to run it (options), what it reports as it goes, what it returns.

The task definition says *what* to train; :class:`SegmentOptions` says where and how
long. :class:`StepReport` is what the ``on_step`` callback sees after every optimizer
step: live progress for a Prefect task or a terminal, and the seam where tests inject a
fault (by raising from it). :class:`SegmentResult` is small and JSON-able: what a caller
needs to chain segments.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class StopReason(str, Enum):
    """Why a segment ended. A ``str``: JSON, comparisons and f-strings see the plain word."""

    STEPS = "steps"  # this segment's own steps are done; the training goes on
    FINISHED = "finished"  # the whole training is done: the checkpoint is marked FINISH
    BUDGET = "budget"  # one more step and a save would not fit in the time budget
    SIGNAL = "signal"  # a stop was requested (SIGTERM)
    ALREADY_DONE = "already_done"  # an earlier attempt committed this very segment

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class StepReport:
    """One optimizer step, as told to ``SegmentOptions.on_step`` right after it."""

    global_step: int  # optimizer steps of the whole training done, this one included
    end_step: int  # the global step this segment stops at, at the latest
    total_steps: int  # optimizer steps of the whole training
    loss: float
    lr: float
    samples_per_second: float  # of this step
    elapsed: float  # seconds since the segment started (its clock, start-up included)
    checkpoint: str | None  # the in-segment checkpoint committed after this step, if any


#: Called after each optimizer step (and after the in-segment checkpoint of that step, if
#: one is due). It runs in the training loop: keep it fast. An exception raised from it
#: ends the segment there, as a crash would: nothing more is committed, and the last
#: committed checkpoint stays intact.
StepCallback = Callable[[StepReport], None]


@dataclass
class SegmentOptions:
    """How to run a segment (where, how long), as opposed to what to train (the task)."""

    checkpoint: str | None = None
    budget_seconds: float | None = None
    data_root: str | None = None
    cache_root: str | None = None
    progress: bool = False
    validate: bool = True
    should_stop: Callable[[], bool] = lambda: False
    started_at: float | None = None  # time.monotonic() when the process began
    on_step: StepCallback | None = None


@dataclass
class SegmentResult:
    """What a caller needs to chain segments: small and JSON-able."""

    steps_done: int
    start_step: int
    global_step: int
    total_steps: int
    finished: bool
    stopped_by: StopReason
    seconds: float
    checkpoint: str
    validation: list[str]
    metrics: str | None
    cache: str | None = None
    skipped_images: list[dict] = field(default_factory=list)  # dataset files not used, why
    #: what one epoch holds (engine.data.epoch_summary.EpochSummary as a dict): images,
    #: uses and micro-batches per epoch, each bucket and subset, skipped files; None
    #: when the segment returned before opening the data (already committed)
    data: dict[str, Any] | None = None
    #: why this segment will not match one uninterrupted run bit for bit (it resumed a
    #: checkpoint trained with another thread count, device type or torch version)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
