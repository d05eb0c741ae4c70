"""The segment's phases: timed inside ``recording()``, nothing kept outside it."""

from __future__ import annotations

from pathlib import Path

from engine.train.options import SegmentOptions
from engine.train.phases import phase, recording
from engine.train.segment import run_segment
from tests.support.engine import make_task


def test_a_phase_outside_a_recording_keeps_nothing():
    with phase("alone"):
        pass
    with recording() as log:
        pass
    assert log.seconds == {}


def test_a_phase_run_twice_adds_up_and_nested_recordings_do_not_leak():
    with recording() as outer:
        with phase("a"):
            pass
        with recording() as inner, phase("b"):
            pass
        with phase("a"):
            pass
    assert list(outer.seconds) == ["a"] and outer.seconds["a"] >= 0.0
    assert list(inner.seconds) == ["b"]


def test_a_segment_reports_each_fixed_cost_phase_in_order(tmp_path: Path):
    task = make_task(**{"train_args.num_train_steps": 1, "train_args.max_train_steps": 2,
                        "train_args.lr_scheduler.lr_warmup_steps": 0})
    with recording() as log:
        run_segment(task, str(tmp_path / "out"),
                    SegmentOptions(cache_root=str(tmp_path / "cache"), validate=False))
    assert list(log.seconds) == [
        "dataset: open and verify", "resume point", "model loading", "adapter set-up",
        "checkpoint restore", "cache opening", "training steps", "checkpoint save",
        "metrics flush",
    ]
    assert all(seconds >= 0.0 for seconds in log.seconds.values())
