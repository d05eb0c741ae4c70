"""The loop's callback: one report after each optimizer step, and the seam for faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.train.options import SegmentOptions, StepReport, StopReason
from engine.train.segment import run_segment
from tests.support.engine import checkpoint_bytes, make_task

THREE_STEPS = {"train_args.num_train_steps": 3, "train_args.max_train_steps": 3,
               "train_args.checkpointing_steps": 1}


class InjectedFault(RuntimeError):
    pass


def test_on_step_reports_each_step_after_its_in_segment_checkpoint(tmp_path: Path) -> None:
    reports: list[StepReport] = []

    def on_step(report: StepReport) -> None:
        if report.checkpoint is not None:  # committed before the report is sent
            assert (Path(report.checkpoint) / "manifest.json").exists()
        reports.append(report)

    result = run_segment(make_task(**THREE_STEPS), str(tmp_path / "s"),
                         SegmentOptions(validate=False, on_step=on_step))
    assert [r.global_step for r in reports] == [1, 2, 3]
    assert {(r.end_step, r.total_steps) for r in reports} == {(3, 3)}
    assert [Path(r.checkpoint).name if r.checkpoint else None for r in reports] == [
        "step-00000001", "step-00000002", None]  # step 3 is the segment's own checkpoint
    records = [json.loads(line) for line in Path(result.metrics).read_text().splitlines()]
    assert [r.loss for r in reports] == [r["loss"] for r in records]
    assert [r.lr for r in reports] == [r["lr"] for r in records]
    assert all(r.samples_per_second > 0 for r in reports)
    assert [r.elapsed for r in reports] == sorted(r.elapsed for r in reports)


def test_a_fault_raised_from_on_step_commits_nothing_more_and_a_rerun_is_exact(
    tmp_path: Path,
) -> None:
    task = make_task(**THREE_STEPS)
    reference = run_segment(task, str(tmp_path / "ref"), SegmentOptions(validate=False))

    def fail_after_step_2(report: StepReport) -> None:
        if report.global_step == 2:
            raise InjectedFault("injected after step 2")

    out = tmp_path / "s"
    with pytest.raises(InjectedFault):
        run_segment(task, str(out), SegmentOptions(validate=False, on_step=fail_after_step_2))
    assert not (out / "checkpoint" / "manifest.json").exists()
    again = run_segment(task, str(out), SegmentOptions(validate=False))
    assert again.finished and again.stopped_by is StopReason.FINISHED
    assert checkpoint_bytes(again.checkpoint) == checkpoint_bytes(reference.checkpoint)


def test_stop_reason_is_the_plain_word_in_json() -> None:
    assert json.dumps({"stopped_by": StopReason.BUDGET}) == '{"stopped_by": "budget"}'
    assert f"{StopReason.SIGNAL}" == str(StopReason.SIGNAL) == "signal"
    assert StopReason("already_done") is StopReason.ALREADY_DONE
