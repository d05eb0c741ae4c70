"""The progress artifact moves during a segment, throttled, and never stops training.

Before, the UI's progress bar moved only when a segment finished.
"""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from engine.train.options import StepReport
from tasks.progress import ArtifactProgress, percent


def report(step: int) -> StepReport:
    return StepReport(global_step=step, end_step=10, total_steps=20, loss=0.25, lr=2e-4,
                      samples_per_second=4.0, elapsed=float(step), checkpoint=None)


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[UUID, float, str]] = []
        self.fail = fail

    def __call__(self, artifact_id: UUID, progress: float, description: str) -> None:
        self.calls.append((artifact_id, progress, description))
        if self.fail:
            raise ConnectionError("API away")


def test_updates_at_most_every_few_seconds_and_the_last_step_on_flush() -> None:
    now = [0.0]
    sent, artifact_id = Recorder(), uuid4()
    progress = ArtifactProgress(str(artifact_id), every_seconds=3, clock=lambda: now[0],
                                update=sent)
    for step in range(1, 11):  # a step a second
        progress(report(step))
        now[0] += 1.0
    assert [p for _, p, _ in sent.calls] == [5.0, 20.0, 35.0, 50.0]  # steps 1, 4, 7, 10
    progress.flush()  # nothing held back
    assert len(sent.calls) == 4
    progress(report(11))  # within 3 s of the last update: held back ...
    progress.flush()  # ... until the segment ends
    assert sent.calls[-1][1] == 55.0
    assert {a for a, _, _ in sent.calls} == {artifact_id}
    assert sent.calls[0][2] == ("step 1 of 20 (this segment ends at 10): loss 0.2500, "
                                "lr 2.00e-04, 4.00 samples/s")


def test_a_failing_update_is_logged_once_and_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent = Recorder(fail=True)
    progress = ArtifactProgress(uuid4(), every_seconds=0, update=sent)
    for step in (1, 2, 3):
        progress(report(step))
    assert len(sent.calls) == 3
    assert caplog.text.count("could not update the progress artifact") == 1


def test_percent() -> None:
    assert percent(1, 6) == 16.7 and percent(6, 6) == 100.0 and percent(0, 0) == 100.0
