"""The time box's arithmetic, without training: what fits, and what it assumes."""

from __future__ import annotations

import time

import pytest

from engine.train.clock import SAFETY, SegmentClock


def test_without_a_budget_every_step_fits() -> None:
    clock = SegmentClock(None, started_at=0.0)
    clock.record_step(1e9)
    assert clock.fits_another_step(10**12) and clock.remaining() == float("inf")


def test_step_time_is_the_slowest_recent_step_else_the_previous_segments() -> None:
    clock = SegmentClock(10.0)
    assert clock.seconds_per_step() is None and clock.step_estimate() == 0.0
    clock.resume_from(0.5)
    assert clock.seconds_per_step() == 0.5
    for seconds in (0.2, 0.3, 0.1):
        clock.record_step(seconds)
    assert clock.seconds_per_step() == 0.3  # measured now; the old figure no longer counts


def test_save_time_is_guessed_from_the_size_until_one_is_timed() -> None:
    clock = SegmentClock(10.0)
    assert clock.save_estimate(50_000_000) == pytest.approx(1.5)  # 0.5 s + 50 MB at 50 MB/s
    clock.record_save(0.25)
    assert clock.save_estimate(50_000_000) == 0.25


def test_validation_after_the_save_is_measured_or_estimated_from_the_step_time() -> None:
    clock = SegmentClock(10.0)
    assert clock.after_save_estimate() == 0.0  # nothing follows the save unless told
    clock.expect_after_save(None, unet_passes=30, samples_per_step=10)
    clock.record_step(3.0)
    # one batch-1 forward ~ 2 * step / (3 * samples) = 0.2 s
    assert clock.after_save_estimate() == pytest.approx(30 * 0.2)
    clock.expect_after_save(1.5)
    assert clock.after_save_estimate() == 1.5


def test_a_step_fits_only_with_its_save_and_what_follows_under_the_safety_margin() -> None:
    clock = SegmentClock(10.0, started_at=time.monotonic())
    clock.record_step(2.0)
    clock.record_save(1.0)
    clock.expect_after_save(4.0)
    assert clock.remaining() > (2.0 + 1.0 + 4.0) * SAFETY
    assert clock.fits_another_step(0)
    clock.expect_after_save(5.5)  # 8.5 s * 1.25 > 10 s
    assert not clock.fits_another_step(0)
