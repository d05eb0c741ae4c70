"""An S3 outage while a dataset is read, for real: the SeaweedFS server is killed mid-run.

Training reads a prepared dataset's images from storage on first use (here: no latent
cache, so the images are read live, one new image per step in the first epoch). When the
storage dies mid-segment, ``loraflow segment`` must end like every other storage failure:
exit code 4, one ``error:`` line saying storage is unavailable, no traceback, within the
store's retry bound. Once the server is back, running the same command again resumes
from the last in-segment checkpoint and ends bit for bit where an undisturbed run does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from engine.data.archive_fetch import fetch
from engine.data.prepared import prepare_for_task
from engine.errors import ExitCode
from engine.store import storage
from engine.store.storage import DEFAULT_RETRY, RetryPolicy, StorageError
from engine.task.definition import TaskDefinition
from engine.train.segment import SegmentOptions, run_segment
from tests.support.engine import checkpoint_bytes, make_task
from tests.support.streams import drain, line_queue, wait_for_line

if TYPE_CHECKING:  # a runtime import would bypass pytest's plugin loading (and rewriting)
    from tests.support.s3_server import SeaweedS3

pytest_plugins = ["tests.support.s3_server"]

ROOT = Path(__file__).resolve().parents[3]
#: Fewer steps than the demo set has images (24): with batch 1, every step of the first
#: epoch reads an image no earlier step read, so the outage hits a live read.
STEPS = 20
#: The server is killed once this step's in-segment checkpoint is committed.
KILL_AFTER_STEP = 2
#: Time a process needs beyond the retry waits: the step in flight, error output, exit.
SLACK_S = 10.0


def outage_task() -> TaskDefinition:
    return make_task(**{
        "train_args.batch_size": 1, "train_args.gradient_accumulation_steps": 1,
        "train_args.num_train_steps": STEPS, "train_args.max_train_steps": STEPS,
        "train_args.checkpointing_steps": 1, "train_args.checkpoints_total_limit": 2,
    })


def _segment_command(task_file: Path, out: Path, data_root: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "segment", str(task_file),
            "--output-dir", str(out), "--data-dir", data_root, "--no-cache",
            "--no-validation"]


@pytest.mark.timeout(420)
def test_s3_outage_while_images_are_read_mid_segment_is_exit_4_then_the_rerun_is_bitwise(
    s3: SeaweedS3, s3_prefix: str, tmp_path: Path
) -> None:
    task = outage_task()
    data_root = f"{s3_prefix}/datasets"
    prepared = prepare_for_task(task, data_root)
    assert prepared.address.startswith(data_root) and prepared.count > STEPS
    reference = run_segment(task, str(tmp_path / "reference"), SegmentOptions(
        validate=False, data_root=data_root, cache_root=None))
    assert reference.finished

    task_file = tmp_path / "task.json"
    task_file.write_text(task.model_dump_json(exclude_unset=True))
    out = tmp_path / "out"
    command = _segment_command(task_file, out, data_root)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = line_queue(process.stderr)
        seen = wait_for_line(
            lines, rf"committed .*checkpoints/step-{KILL_AFTER_STEP:08d}", 240)
        s3.stop()  # SIGKILL: the next step reads an image no step has read yet
        stopped_at = time.monotonic()
        process.wait(timeout=DEFAULT_RETRY.max_total_wait_s + 60)
        failed_after = time.monotonic() - stopped_at
        stderr = "".join(seen + drain(lines, 30))
        stdout = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        s3.start()
    print(f"S3 outage mid-segment: exit {process.returncode} {failed_after:.2f}s after the "
          f"server died")

    assert process.returncode == ExitCode.STORAGE, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    print(errors[0])
    assert f"storage unavailable after {DEFAULT_RETRY.attempts} attempt(s)" in errors[0]
    assert f"{prepared.address}/images/" in errors[0]  # the image read that failed
    assert sum(DEFAULT_RETRY.delays()) <= failed_after < DEFAULT_RETRY.max_total_wait_s + SLACK_S
    assert stdout == ""  # no result line: the segment did not end
    committed = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert committed and all(int(n.rsplit("-", 1)[1]) < STEPS for n in committed)
    assert not (out / "checkpoint").exists()

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert again.returncode == ExitCode.OK, again.stderr
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["finished"] and result["global_step"] == STEPS
    assert checkpoint_bytes(result["checkpoint"]) == checkpoint_bytes(reference.checkpoint)


@pytest.mark.timeout(120)
def test_archive_fetch_during_an_s3_outage_is_a_storage_error_and_leaves_nothing(
    s3: SeaweedS3, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", b"alpha" * 1000)
    url = f"{s3_prefix}/set.zip"
    storage.write_bytes(url, archive.read_bytes())
    assert fetch(url, tmp_path / "ok", progress=False).read_bytes() == archive.read_bytes()

    monkeypatch.setattr(storage, "DEFAULT_RETRY", RetryPolicy(attempts=2, initial_delay_s=0.1))
    s3.stop()
    try:
        with pytest.raises(StorageError, match="storage unavailable after 2 attempt"):
            fetch(url, tmp_path / "down", progress=False)
    finally:
        s3.start()
    assert list((tmp_path / "down").iterdir()) == []  # no partial download left
