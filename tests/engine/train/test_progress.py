"""The console progress of a segment (``on_step``): loss, lr and samples/s as it trains.

Before, nothing was printed during a segment: tens of seconds of silence.
"""

from __future__ import annotations

import io

import pytest

from engine.train.options import StepReport
from engine.train.progress import QUIET_ENV, StepBar, all_of, console_progress_wanted


def report(step: int, end: int = 4, total: int = 8) -> StepReport:
    return StepReport(global_step=step, end_step=end, total_steps=total, loss=0.125 * step,
                      lr=1e-4, samples_per_second=3.5, elapsed=1.5 * step, checkpoint=None)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_into_a_file_a_line_at_the_first_step_then_throttled_and_at_the_segment_end() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = StepBar(out, every_seconds=10, clock=clock)
    for step in range(1, 5):  # steps 1-4, 4 s apart; the segment ends at step 4
        bar(report(step))
        clock.now += 4
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/8", "4/8"]  # step 1, then the last
    assert lines[0] == "step 1/8 (12%) loss 0.1250, lr 1.00e-04, 3.50 samples/s, 1.5 s"
    clock.now += 10
    bar(report(5, end=8))
    assert out.getvalue().splitlines()[-1].startswith("step 5/8")


def test_on_a_terminal_a_bar_with_loss_lr_and_samples_per_second() -> None:
    out = Terminal()
    bar = StepBar(out)
    for step in (3, 4):
        bar(report(step))
    bar.close()
    text = out.getvalue()
    assert "4/8" in text and "training" in text
    assert "loss 0.5000" in text and "lr 1.00e-04" in text and "3.50 samples/s" in text
    assert "\r" in text  # redrawn in place


def test_a_broken_display_never_stops_training(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    out.close()  # every write raises ValueError
    bar = StepBar(out)
    bar(report(1))
    bar(report(2))  # switched off, silent
    assert "progress display switched off" in caplog.text


def test_quiet_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(QUIET_ENV, raising=False)
    assert console_progress_wanted()
    monkeypatch.setenv(QUIET_ENV, "1")
    assert not console_progress_wanted()


def test_all_of_calls_each_in_order_and_skips_none() -> None:
    seen: list[tuple[str, int]] = []
    first = lambda r: seen.append(("a", r.global_step))  # noqa: E731
    second = lambda r: seen.append(("b", r.global_step))  # noqa: E731
    assert all_of(None, None) is None
    assert all_of(None, first) is first
    all_of(first, None, second)(report(2))
    assert seen == [("a", 2), ("b", 2)]
