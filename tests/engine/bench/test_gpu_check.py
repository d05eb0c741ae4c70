"""The GPU check's smoke mode runs on a CPU and prints its markdown block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.bench.gpu_check import main


def test_smoke_mode_prints_the_block_and_passes_bit_exactness(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "check.json"
    assert main(["--smoke", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "### GPU check" in text and "SMOKE RUN" in text
    report = json.loads(out.read_text())
    assert report["bit_exactness"][0]["three_segments_equal_one_run"] is True
    assert report["bit_exactness"][0]["two_runs_equal"] is True
    assert report["throughput"][0]["overhead"][0]["overhead_fraction"] is not None
    assert report["determinism_cost"]["fastest_over_deterministic"] > 0
