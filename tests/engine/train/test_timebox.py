"""The time box, stop requests, and what a segment leaves behind (metrics, validation)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import BudgetTooShortError, ConfigurationError, ExitCode
from engine.train.segment import SegmentOptions, run_segment
from tests.support.engine import checkpoint_bytes, make_task, run_budgeted

ROOT = Path(__file__).resolve().parents[3]
LONG = {"train_args.batch_size": 4, "train_args.gradient_accumulation_steps": 1,
        "train_args.max_train_steps": 120, "train_args.num_train_steps": 120}


def test_budgeted_segment_stops_early_and_resumes_to_the_unbudgeted_result(tmp_path: Path) -> None:
    task = make_task(**LONG)
    cache = str(tmp_path / "cache")
    reference = run_segment(task, str(tmp_path / "ref"),
                            SegmentOptions(cache_root=cache, validate=False))
    assert reference.finished

    budgeted = run_budgeted(task, tmp_path / "b0", cache, budget=2.5)
    first = budgeted.result
    assert first.stopped_by == "budget" and 0 < first.global_step < 120
    assert budgeted.elapsed < budgeted.budget, budgeted.overrun_message()
    assert (Path(first.checkpoint) / "manifest.json").exists()

    rest = run_segment(task, str(tmp_path / "b1"),
                       SegmentOptions(cache_root=cache, validate=False,
                                      checkpoint=first.checkpoint))
    assert rest.finished
    assert checkpoint_bytes(rest.checkpoint) == checkpoint_bytes(reference.checkpoint)


def test_budget_too_short_for_one_step_writes_nothing(tmp_path: Path) -> None:
    task = make_task()
    with pytest.raises(BudgetTooShortError, match="no room for one step"):
        run_segment(task, str(tmp_path / "s"), SegmentOptions(validate=False, budget_seconds=0.01))
    assert not (tmp_path / "s" / "checkpoint").exists()


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, **kwargs)


def test_cli_budget_too_short_exits_with_its_own_code(tmp_path: Path) -> None:
    done = _cli("segment", str(ROOT / "examples" / "quickstart.json"), "--output-dir",
                str(tmp_path / "out"), "--budget-seconds", "0.5")
    assert done.returncode == ExitCode.BUDGET_TOO_SHORT, done.stderr
    assert "no room for one step" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "checkpoint" / "manifest.json").exists()


def test_cli_segments_chain_to_finish_with_checkpoint_and_validation_each_time(
    tmp_path: Path,
) -> None:
    checkpoint, summaries = None, []
    for i in range(5):
        out = tmp_path / f"seg{i}"
        args = ["segment", str(ROOT / "examples" / "quickstart.json"), "--output-dir", str(out)]
        if checkpoint:
            args += ["--checkpoint", checkpoint]
        done = _cli(*args)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        summaries.append(summary)
        assert (out / "checkpoint" / "manifest.json").exists()
        assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["00.png", "01.png"]
        checkpoint = summary["checkpoint"]
        if summary["finished"]:
            break
    assert [s["global_step"] for s in summaries] == [20, 40, 60]
    assert summaries[-1]["finished"] and (Path(checkpoint) / "FINISH").exists()
    assert not (Path(summaries[0]["checkpoint"]) / "FINISH").exists()


def test_sigterm_commits_a_checkpoint_at_the_next_step_and_exits(tmp_path: Path) -> None:
    task_file = tmp_path / "task.json"
    doc = json.loads((ROOT / "examples" / "quickstart.json").read_text())
    doc["train_args"].update({"num_train_steps": 5000, "max_train_steps": 5000})
    task_file.write_text(json.dumps(doc))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "segment", str(task_file), "--output-dir", str(out),
         "--no-validation"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until the loop runs (no fixed sleep)
        if "training steps" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "signal" and 0 <= summary["global_step"] < 5000
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["global_step"] == summary["global_step"] and manifest["finished"] is False


def test_metrics_are_written_as_json_lines_and_tensorboard_events(tmp_path: Path) -> None:
    task = make_task(**{"train_args.num_train_steps": 3, "train_args.max_train_steps": 3})
    result = run_segment(task, str(tmp_path / "s"), SegmentOptions(validate=False))
    records = [json.loads(line) for line in Path(result.metrics).read_text().splitlines()]
    assert [r["global_step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"loss", "lr", "grad_norm", "seconds", "samples_per_second", "epoch"} <= set(r)
        assert r["loss"] > 0 and r["samples"] in (10, 4)
    assert list((tmp_path / "s" / "tensorboard").glob("events.out.tfevents.*"))


def test_validation_images_are_the_same_pixels_for_the_same_inputs(tmp_path: Path) -> None:
    task = make_task(**{"train_args.num_train_steps": 2, "train_args.max_train_steps": 2,
                        "validation.num_images": 2})
    a = run_segment(task, str(tmp_path / "a"), SegmentOptions())
    b = run_segment(task, str(tmp_path / "b"), SegmentOptions())
    assert len(a.validation) == 2
    pixels_a = [Path(p).read_bytes() for p in a.validation]
    assert pixels_a == [Path(p).read_bytes() for p in b.validation]


def test_fp16_on_cpu_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    task = make_task(mixed_precision="fp16")
    with pytest.raises(ConfigurationError, match="fp16' needs a GPU"):
        run_segment(task, str(tmp_path / "s"), SegmentOptions(validate=False))


def test_rerunning_a_committed_segment_returns_it_without_training(tmp_path: Path) -> None:
    task = make_task(**{"train_args.num_train_steps": 2, "train_args.max_train_steps": 4})
    first = run_segment(task, str(tmp_path / "s"), SegmentOptions(validate=False))
    before = (Path(first.checkpoint) / "manifest.json").stat().st_mtime_ns
    again = run_segment(task, str(tmp_path / "s"), SegmentOptions(validate=False))
    assert again.stopped_by == "already_done" and again.global_step == first.global_step
    assert (Path(first.checkpoint) / "manifest.json").stat().st_mtime_ns == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="data-loader workers need fork here")
def test_dataloader_workers_give_the_same_result_as_the_main_process(tmp_path: Path) -> None:
    common = {"train_args.num_train_steps": 3, "train_args.max_train_steps": 3}
    main = run_segment(make_task(**common), str(tmp_path / "main"), SegmentOptions(validate=False))
    workers = run_segment(make_task(**common, dataloader_num_workers=2), str(tmp_path / "w"),
                          SegmentOptions(validate=False))
    assert checkpoint_bytes(main.checkpoint) == checkpoint_bytes(workers.checkpoint)
