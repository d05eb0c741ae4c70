"""The bench's markdown shows the step's overhead that is not UNet compute
(engine/bench/overhead_table.py, engine/bench/report.py)."""

from __future__ import annotations

from engine.bench.overhead_table import overhead_lines

ROW = {"batch_size": 8, "step_seconds": 0.040, "unet_forward_backward_seconds": 0.0364,
       "overhead_seconds": 0.0036, "overhead_fraction": 0.09,
       "overhead_fraction_per_repeat": [0.085, 0.09, 0.11], "training_step_seconds": 0.041}


def test_each_batch_size_gets_step_unet_overhead_and_share() -> None:
    header, rule, row = overhead_lines([ROW])
    assert header.startswith("| overhead (not UNet compute) | step ms | UNet fwd+bwd ms |")
    assert rule.count("|") == header.count("|")
    assert row == "| batch 8 | 40.00 | 36.40 | 3.60 | 9.0% | 8.5-11.0% |"


def test_a_row_without_per_repeat_shares_shows_a_dash() -> None:
    row = overhead_lines([ROW | {"overhead_fraction_per_repeat": []}])[-1]
    assert row.endswith("| 9.0% | - |")
