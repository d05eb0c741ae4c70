"""The run's Prefect progress artifact, moved *during* a segment, not only after it.

Before, the progress bar in the UI moved only when a segment finished: a long segment
looked stalled. The flow creates the artifact (``flows.artifacts.start_progress``) and
hands its id to each segment, which may run in this process or in a ``finetune-segment``
flow run on another worker: an update is an API call by id, so it works from whichever
process the task runs in. Updates are throttled to one every
:data:`UPDATE_EVERY_SECONDS` (an API call per step would slow small steps and flood the
server), plus the last step of the segment (:meth:`ArtifactProgress.flush`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from uuid import UUID

from engine.train.options import StepReport
from engine.train.progress import describe_step

log = logging.getLogger(__name__)

#: Seconds between two updates of the progress artifact during a segment, at least.
UPDATE_EVERY_SECONDS = 3.0

#: ``update(artifact_id, percent, description)``: Prefect's, or a test's stand-in.
Updater = Callable[[UUID, float, str], object]


def percent(done_steps: int, total_steps: int) -> float:
    """Share of the training done, as the progress artifact shows it (0-100, 0.1 steps)."""
    return 100.0 if total_steps <= 0 else round(100.0 * done_steps / total_steps, 1)


def progress_description(report: StepReport) -> str:
    return (f"step {report.global_step} of {report.total_steps} (this segment ends at "
            f"{report.end_step}): {describe_step(report)}")


def _prefect_update(artifact_id: UUID, progress: float, description: str) -> object:
    from prefect.artifacts import update_progress_artifact

    return update_progress_artifact(artifact_id, progress, description=description)


class ArtifactProgress:
    """An ``on_step`` callback that moves the progress artifact, at most every few seconds.

    An update that fails (the API is away for a moment) is logged once and never raised:
    training does not depend on the UI.
    """

    def __init__(self, artifact_id: str | UUID, *, every_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 update: Updater | None = None) -> None:
        self.artifact_id = UUID(str(artifact_id))
        self.every_seconds = UPDATE_EVERY_SECONDS if every_seconds is None else every_seconds
        self.clock = clock
        self.update = update or _prefect_update
        self._sent_at: float | None = None
        self._pending: StepReport | None = None
        self._warned = False

    def __call__(self, report: StepReport) -> None:
        self._pending = report
        now = self.clock()
        if self._sent_at is None or now - self._sent_at >= self.every_seconds:
            self._send(now)

    def flush(self) -> None:
        """Send the last step seen, if it was held back by the throttle."""
        if self._pending is not None:
            self._send(self.clock())

    def _send(self, now: float) -> None:
        report, self._pending = self._pending, None
        self._sent_at = now
        if report is None:
            return
        try:
            self.update(self.artifact_id, percent(report.global_step, report.total_steps),
                        progress_description(report))
        except Exception as exc:  # noqa: BLE001 - the UI must never stop training
            if not self._warned:
                self._warned = True
                log.warning("could not update the progress artifact: %s", exc)
