"""The segment's time box: decide before each step whether one more still fits.

A sync Prefect task's timeout cannot interrupt a torch loop, so the budget is enforced
here, inside the loop: before each optimizer step the clock checks that the slowest step
seen so far, plus the time a checkpoint save takes, plus what must follow the save
(validation), still fits in what is left, with a safety margin. The first step of a
run's first segment has nothing measured to go by and is taken on trust; later segments
start from the step time their input checkpoint recorded.

The clock's measurements change only through its own methods, each called from one
place: the segment tells it once what is known before training (:meth:`resume_from`,
:meth:`expect_after_save`), the loop records steps, the saver records saves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

#: Step estimates use the slowest of the last this-many steps: recent, but not one lucky one.
STEP_WINDOW = 20
#: Estimates are scaled by this before comparing with what is left.
SAFETY = 1.25
#: Before the first save is measured: a save costs 0.5 s plus its bytes at this rate.
GUESSED_SAVE_BYTES_PER_SECOND = 50e6
GUESSED_SAVE_OVERHEAD_SECONDS = 0.5


@dataclass
class SegmentClock:
    budget_seconds: float | None
    started_at: float = field(default_factory=time.monotonic)
    _steps: list[float] = field(default_factory=list, init=False)
    _save: float | None = field(default=None, init=False)  # the last save of this segment
    _known_step: float | None = field(default=None, init=False)  # previous segment's
    _after_save: float | None = field(default=0.0, init=False)  # None: estimate it
    _unet_passes_after_save: int = field(default=0, init=False)
    _samples_per_step: int = field(default=1, init=False)

    # -- what it is told -----------------------------------------------------------------

    def resume_from(self, seconds_per_step: float | None) -> None:
        """The step time the previous segment measured: the estimate until one is timed."""
        self._known_step = seconds_per_step

    def expect_after_save(self, seconds: float | None, *, unet_passes: int = 0,
                          samples_per_step: int = 1) -> None:
        """What follows the final save: ``seconds`` if known (0 for none), else ``None``
        and an estimate from ``unet_passes`` batch-1 UNet forwards (validation images)."""
        self._after_save = seconds
        self._unet_passes_after_save = unet_passes
        self._samples_per_step = samples_per_step

    def record_step(self, seconds: float) -> None:
        self._steps.append(seconds)

    def record_save(self, seconds: float) -> None:
        self._save = seconds

    # -- what it answers -----------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def remaining(self) -> float:
        if self.budget_seconds is None:
            return float("inf")
        return self.budget_seconds - self.elapsed()

    def seconds_per_step(self) -> float | None:
        """The slowest recent step of this segment, else the previous segment's figure.

        Saved in each checkpoint, so the next segment's first step is already budgeted.
        """
        if self._steps:
            return max(self._steps[-STEP_WINDOW:])
        return self._known_step

    def step_estimate(self) -> float:
        return self.seconds_per_step() or 0.0

    def save_estimate(self, state_bytes: int) -> float:
        """Measured save time, or a conservative guess from the checkpoint's size."""
        if self._save is not None:
            return self._save
        return GUESSED_SAVE_OVERHEAD_SECONDS + state_bytes / GUESSED_SAVE_BYTES_PER_SECOND

    def after_save_estimate(self) -> float:
        """Validation time: measured by the previous segment, or from the step time.

        A training step is about three forward passes per sample (forward + backward), so
        one batch-1 forward costs about step / (3 * samples); doubled because batch-1
        passes use the hardware less well.
        """
        if self._after_save is not None:
            return self._after_save
        per_pass = 2 * self.step_estimate() / (3 * max(self._samples_per_step, 1))
        return self._unet_passes_after_save * per_pass

    def fits_another_step(self, state_bytes: int) -> bool:
        """Whether one more step, a save of ``state_bytes`` and what follows still fit."""
        if self.budget_seconds is None:
            return True
        need = self.step_estimate() + self.save_estimate(state_bytes) + self.after_save_estimate()
        return need * SAFETY < self.remaining()
