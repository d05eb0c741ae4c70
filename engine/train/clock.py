"""The segment's time box: decide before each step whether one more still fits.

A sync Prefect task's timeout cannot interrupt a torch loop, so the budget is enforced
here, inside the loop: before each optimizer step the clock checks that the slowest step
seen so far, plus the time a checkpoint save takes, plus what must follow the save
(validation), still fits in what is left, with a safety margin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SegmentClock:
    budget_seconds: float | None
    started_at: float = field(default_factory=time.monotonic)
    safety: float = 1.25  # estimates are scaled by this before comparing with what is left
    step_seconds: list[float] = field(default_factory=list)
    save_seconds: float | None = None  # measured on the first save of this segment
    known_step_seconds: float | None = None  # from the previous segment's checkpoint
    after_save_seconds: float | None = 0.0  # validation after the final save; None: estimate
    unet_passes_after_save: int = 0  # UNet forwards (batch 1) that validation will make
    samples_per_step: int = 1

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def remaining(self) -> float:
        return float("inf") if self.budget_seconds is None else self.budget_seconds - self.elapsed()

    def step_estimate(self) -> float:
        if self.step_seconds:
            return max(self.step_seconds[-20:])
        return self.known_step_seconds or 0.0

    def save_estimate(self, state_bytes: int) -> float:
        """Measured save time, or a conservative guess from the size (50 MB/s) plus 0.5 s."""
        if self.save_seconds is not None:
            return self.save_seconds
        return 0.5 + state_bytes / 50e6

    def fits_another_step(self, state_bytes: int) -> bool:
        if self.budget_seconds is None:
            return True
        need = self.step_estimate() + self.save_estimate(state_bytes) + self.after_save_estimate()
        return need * self.safety < self.remaining()

    def after_save_estimate(self) -> float:
        """Validation time: measured by the previous segment, or from the step time.

        A training step is about three forward passes per sample (forward + backward), so
        one batch-1 forward costs about step / (3 * samples); doubled because batch-1
        passes use the hardware less well.
        """
        if self.after_save_seconds is not None:
            return self.after_save_seconds
        per_pass = 2 * self.step_estimate() / (3 * max(self.samples_per_step, 1))
        return self.unet_passes_after_save * per_pass

    def fits_save(self, state_bytes: int) -> bool:
        if self.budget_seconds is None:
            return True
        return self.save_estimate(state_bytes) < self.remaining()
