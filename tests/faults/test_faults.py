"""Faults done for real: kill -9, damaged checkpoints, S3 outages, a full disk, SIGTERM.

Nothing here is mocked away: processes are killed with SIGKILL, bytes are flipped on disk,
the S3 server (SeaweedFS) is killed mid-run, the disk is a real 256 KiB tmpfs. Each test
checks the engine's contracts (docs/reliability.md): a checkpoint exists only once its
manifest is written; a damaged one is detected and either replaced by the newest good
in-segment checkpoint or refused with a clear error; resuming gives the bit-for-bit
result of an undisturbed run; storage failures are a bounded, clear StorageError.

A test that documents a known engine gap is a strict xfail: it starts passing (and then
fails as XPASS) when the engine is fixed, and the marker must go.

Why one module over 400 lines: it is the README's reliability table, one test per row,
kept in one place so the table and its proofs are read side by side.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from engine.errors import ExitCode
from engine.lora.weights import LORA_FILE
from engine.store import storage
from engine.store.commit import (
    FINISH_NAME,
    MANIFEST_NAME,
    CheckpointError,
    commit_checkpoint,
    list_committed,
    read_checkpoint,
    remove_checkpoint,
)
from engine.store.storage import DEFAULT_RETRY, TEMP_MARKER, RetryPolicy, StorageError
from engine.task.definition import TaskDefinition
from engine.train.options import StepReport
from engine.train.segment import SegmentOptions, SegmentResult, run_segment
from engine.train.state import OPTIMIZER_FILE, STATE_FILE
from tests.faults.kill_campaign import inspect_output, run_campaign
from tests.support.engine import checkpoint_bytes, make_task
from tests.support.streams import line_queue, wait_for_line

if TYPE_CHECKING:  # a runtime import would bypass pytest's plugin loading (and rewriting)
    from tests.support.s3_server import SeaweedS3

pytest_plugins = ["tests.support.s3_server"]

ROOT = Path(__file__).resolve().parents[2]
#: Batch 1, no accumulation: the cheapest real steps, so commits are a large share of time.
LIGHT = {"train_args.batch_size": 1, "train_args.gradient_accumulation_steps": 1}
KILL_TRIALS = 20
KILL_SEED = 20261123


def light_task(steps: int, total: int | None = None, **changes: Any) -> TaskDefinition:
    return make_task(**{**LIGHT, "train_args.num_train_steps": steps,
                        "train_args.max_train_steps": total or steps, **changes})


def write_task(task: TaskDefinition, path: Path) -> Path:
    path.write_text(task.model_dump_json(exclude_unset=True))
    return path


@dataclass
class CliRun:
    code: int
    stdout: str
    stderr: str


def run_cli(argv: list[str]) -> CliRun:
    """``flows.cli.main(argv)`` in this process, output captured, signal handlers restored.

    The same code path as the ``loraflow`` console script, minus ~5 s of process start-up;
    ``segment`` installs SIGTERM/SIGINT handlers, which must not outlive the call here.
    """
    from flows.cli import main

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return CliRun(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One latent cache for the module: every light task encodes the same demo data."""
    return str(tmp_path_factory.mktemp("cache"))


# -- 1. kill -9 at random moments ---------------------------------------------------------


@pytest.mark.timeout(420)
def test_kill_9_at_random_moments_leaves_only_verifiable_checkpoints_and_resumes_bitwise(
    tmp_path: Path,
) -> None:
    """20 SIGKILLs (seeded moments, some aimed inside checkpoint writes) on a segment that
    commits after every step; see tests/faults/kill_campaign.py for what is checked."""
    result = run_campaign(KILL_TRIALS, KILL_SEED, tmp_path, log=print)
    print(json.dumps(result.summary(), sort_keys=True))
    assert result.trials_run >= KILL_TRIALS
    assert result.violations == []
    assert result.crashes == 0 and result.mismatches == 0
    assert result.faults_survived == result.trials_run
    assert result.kills_inside_write >= 1, "no kill landed inside a checkpoint write"


class Killed(BaseException):
    """Stands for the process dying at this point (nothing after it runs)."""


def _dying_remove_tree(url: str, **_: Any) -> None:
    """A recursive delete killed after its first file, with data files listed first (one
    order a directory listing may give): what SIGKILL leaves mid-``rm -r``."""
    folder = Path(url)
    files = sorted((p for p in folder.iterdir() if p.is_file()),
                   key=lambda p: p.name in (MANIFEST_NAME, FINISH_NAME))
    if files:
        files[0].unlink()
    raise Killed(url)


def test_remove_checkpoint_uncommits_before_deleting_so_a_kill_midway_leaves_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "checkpoints"
    url = str(root / "step-00000001")
    commit_checkpoint(url, {"a.bin": b"a" * 100, "b.bin": b"b" * 100},
                      meta={"global_step": 1, "task_fingerprint": "fp", "finished": True})
    monkeypatch.setattr(storage, "remove_tree", _dying_remove_tree)
    with pytest.raises(Killed):
        remove_checkpoint(url)
    assert list_committed(str(root)) == []
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        read_checkpoint(url)
    assert not (Path(url) / FINISH_NAME).exists()


def test_retention_killed_mid_delete_never_leaves_a_manifest_over_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_root: str
) -> None:
    """Retention deletes old in-segment checkpoints with remove_checkpoint (uncommit first);
    with a plain recursive delete a kill midway left a manifest over missing files."""
    task = light_task(3, **{"train_args.checkpointing_steps": 1,
                            "train_args.checkpoints_total_limit": 1})
    monkeypatch.setattr(storage, "remove_tree", _dying_remove_tree)
    with pytest.raises(Killed):  # at step 2, retention deletes step-1 and "dies"
        run_segment(task, str(tmp_path / "s"), SegmentOptions(validate=False,
                                                               cache_root=cache_root))
    state = inspect_output(tmp_path / "s")
    assert state.violations == []
    assert state.partial_dirs == [str(tmp_path / "s" / "checkpoints" / "step-00000001")]


def test_rerun_after_a_kill_between_manifest_and_finish_marker_restores_the_marker(
    tmp_path: Path, cache_root: str
) -> None:
    task = light_task(2)
    out = tmp_path / "s"
    first = run_segment(task, str(out), SegmentOptions(validate=False, cache_root=cache_root))
    assert first.finished
    (out / "checkpoint" / FINISH_NAME).unlink()  # the state such a kill leaves
    again = run_segment(task, str(out), SegmentOptions(validate=False, cache_root=cache_root))
    assert again.stopped_by == "already_done" and again.finished
    assert (out / "checkpoint" / FINISH_NAME).exists()


# -- 2. damaged checkpoints ---------------------------------------------------------------


@dataclass
class Trained:
    reference: dict[str, bytes]  # the undisturbed 6-step run
    first: Path  # a 3-step segment: checkpoint/ (step 3) and checkpoints/step-1, step-2
    other_task: Path  # a committed checkpoint of the same shape, another seed
    cache: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_root: str) -> Trained:
    root = tmp_path_factory.mktemp("trained")
    opts = SegmentOptions(validate=False, cache_root=cache_root)
    reference = run_segment(light_task(6), str(root / "reference"), opts)
    run_segment(light_task(3, 6, **{"train_args.checkpointing_steps": 1}), str(root / "first"),
                opts)
    run_segment(light_task(3, 6, seed=8), str(root / "other"), opts)
    assert sorted(p.name for p in (root / "first" / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002"]
    return Trained(checkpoint_bytes(reference.checkpoint), root / "first",
                   root / "other" / "checkpoint", cache_root)


def _flip_byte(folder: Path, trained: Trained) -> None:
    data = bytearray((folder / OPTIMIZER_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / OPTIMIZER_FILE).write_bytes(bytes(data))


def _truncate(folder: Path, trained: Trained) -> None:
    data = (folder / LORA_FILE).read_bytes()
    (folder / LORA_FILE).write_bytes(data[: len(data) // 2])


def _drop_manifest(folder: Path, trained: Trained) -> None:
    (folder / MANIFEST_NAME).unlink()


def _edit_manifest(folder: Path, trained: Trained) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["global_step"] = 2  # still valid JSON, still the right shape
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def _foreign_file(folder: Path, trained: Trained) -> None:
    shutil.copy(trained.other_task / OPTIMIZER_FILE, folder / OPTIMIZER_FILE)  # same size


DAMAGES: dict[str, tuple[Callable[[Path, Trained], None], str]] = {
    "flipped-byte": (_flip_byte, f"{OPTIMIZER_FILE} sha256 mismatch"),
    "truncated-file": (_truncate, f"{LORA_FILE} size mismatch"),
    "missing-manifest": (_drop_manifest, "manifest.json missing"),
    "edited-manifest": (_edit_manifest, "modified after it was written"),
    "file-from-another-task": (_foreign_file, f"{OPTIMIZER_FILE} sha256 mismatch"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_falls_back_to_the_newest_kept_one_and_ends_bitwise_equal(
    trained: Trained, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    damage_fn, detected_as = DAMAGES[damage]
    shutil.copytree(trained.first, tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoint"
    damage_fn(checkpoint, trained)
    with pytest.raises(CheckpointError, match=re.escape(detected_as)):
        read_checkpoint(str(checkpoint))

    with caplog.at_level(logging.WARNING, logger="engine.train.resume"):
        result = run_segment(light_task(6), str(tmp_path / "second"), SegmentOptions(
            checkpoint=str(checkpoint), validate=False, cache_root=trained.cache))
    assert "falling back to" in caplog.text and detected_as in caplog.text
    assert (result.start_step, result.global_step, result.finished) == (2, 6, True)
    assert checkpoint_bytes(result.checkpoint) == trained.reference


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_without_kept_ones_is_refused_by_the_cli_with_exit_2(
    trained: Trained, tmp_path: Path, damage: str
) -> None:
    damage_fn, detected_as = DAMAGES[damage]
    checkpoint = tmp_path / "first" / "checkpoint"
    shutil.copytree(trained.first / "checkpoint", checkpoint)  # no checkpoints/ beside it
    damage_fn(checkpoint, trained)
    out = tmp_path / "out"
    run = run_cli(["segment", str(write_task(light_task(6), tmp_path / "task.json")),
                   "--output-dir", str(out), "--checkpoint", str(checkpoint),
                   "--cache-dir", trained.cache, "--no-validation"])
    assert run.code == ExitCode.BAD_INPUT, run.stderr
    assert run.stderr.startswith("error: ") and detected_as in run.stderr
    assert "no earlier committed checkpoint is kept beside it" in run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert not (out / "checkpoint" / MANIFEST_NAME).exists()


def test_checkpoint_of_another_task_is_refused_by_the_cli_process_naming_the_field(
    trained: Trained, tmp_path: Path
) -> None:
    """A whole, valid checkpoint of another task (seed 8): not damage, a mix-up. The real
    ``loraflow segment`` process exits 2 and names what differs, with no traceback."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "segment",
         str(write_task(light_task(6), tmp_path / "task.json")), "--output-dir", str(out),
         "--checkpoint", str(trained.other_task), "--cache-dir", trained.cache,
         "--no-validation"],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr[-3000:]
    assert "belongs to a different task" in done.stderr
    assert "/seed: checkpoint has 8, task has 7" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not out.exists() or not any(out.rglob(MANIFEST_NAME))


def test_retention_keeps_the_newest_two_and_deletes_only_after_a_newer_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_root: str
) -> None:
    out = tmp_path / "s"
    root = str(out / "checkpoints")
    task = light_task(6, **{"train_args.checkpointing_steps": 1,
                            "train_args.checkpoints_total_limit": 2})
    deletions: list[tuple[int, list[int]]] = []
    kept: list[list[int]] = []
    real_remove_tree = storage.remove_tree

    def steps_committed() -> list[int]:
        return [int(Path(u).name.split("-")[1]) for u in list_committed(root)]

    def spy(url: str, **kwargs: Any) -> None:
        if Path(url).parent == Path(root):
            deletions.append((int(Path(url).name.split("-")[1]), steps_committed()))
        real_remove_tree(url, **kwargs)

    monkeypatch.setattr(storage, "remove_tree", spy)
    result = run_segment(task, str(out), SegmentOptions(
        validate=False, cache_root=cache_root, on_step=lambda report: kept.append(
            steps_committed())))
    assert result.finished
    # after steps 1..5 (step 6 is the segment's own checkpoint, not an in-segment one)
    assert kept == [[1], [1, 2], [2, 3], [3, 4], [4, 5], [4, 5]]
    assert [step for step, _ in deletions] == [1, 2, 3]
    for deleted, committed_then in deletions:
        newer = [s for s in committed_then if s > deleted]
        assert len(newer) >= 2, f"step {deleted} deleted while only {newer} were newer"
    for url in list_committed(root):
        read_checkpoint(url)


# -- 3. S3 outages ----------------------------------------------------------------------


def _s3_checkpoint_bytes(url: str) -> dict[str, bytes]:
    """:func:`checkpoint_bytes` for a checkpoint on any storage."""
    state = json.loads(storage.read_bytes(storage.join(url, STATE_FILE)))
    exact = {k: state[k] for k in ("global_step", "epoch", "step_in_epoch", "optimizer",
                                   "lr_scheduler")}
    return {
        "lora": storage.read_bytes(storage.join(url, LORA_FILE)),
        "optimizer": storage.read_bytes(storage.join(url, OPTIMIZER_FILE)),
        "state": json.dumps(exact, sort_keys=True).encode(),
    }


def _keys_under(s3: SeaweedS3, prefix: str) -> list[str]:
    base = prefix.removeprefix("s3://")
    return sorted(k.removeprefix(base + "/") for k in s3.filesystem().find(base))


@pytest.mark.timeout(240)
def test_s3_outage_at_the_final_commit_is_a_bounded_storage_error_then_the_rerun_completes(
    s3: SeaweedS3, s3_prefix: str, tmp_path: Path, cache_root: str
) -> None:
    task = light_task(3)
    opts = {"validate": False, "cache_root": cache_root}
    reference = run_segment(task, str(tmp_path / "reference"), SegmentOptions(**opts))
    out = f"{s3_prefix}/segment"
    stopped_at: list[float] = []

    def outage_after_the_last_step(report: StepReport) -> None:
        if report.global_step == 3:
            s3.stop()  # SIGKILL: the final commit is next
            stopped_at.append(time.monotonic())

    try:
        with pytest.raises(StorageError) as info:
            run_segment(task, out, SegmentOptions(**opts, on_step=outage_after_the_last_step))
        failed_after = time.monotonic() - stopped_at[0]
    finally:
        s3.start()
    print(f"S3 outage: StorageError {failed_after:.2f}s after the server died: {info.value}")
    waits = sum(DEFAULT_RETRY.delays())
    assert waits <= failed_after < DEFAULT_RETRY.max_total_wait_s + 5.0
    assert info.value.attempts == DEFAULT_RETRY.attempts
    assert f"storage unavailable after {DEFAULT_RETRY.attempts} attempt(s)" in str(info.value)
    assert not storage.exists(f"{out}/checkpoint/{MANIFEST_NAME}")

    again = run_segment(task, out, SegmentOptions(**opts))
    assert again.finished and again.stopped_by == "finished" and again.steps_done == 3
    assert _s3_checkpoint_bytes(again.checkpoint) == checkpoint_bytes(reference.checkpoint)
    keys = _keys_under(s3, out)
    checkpoint_keys = [k for k in keys if k.startswith("checkpoint/")]
    assert checkpoint_keys == [f"checkpoint/{n}" for n in sorted(
        [FINISH_NAME, MANIFEST_NAME, LORA_FILE, OPTIMIZER_FILE, STATE_FILE])]
    assert not [k for k in keys if TEMP_MARKER in k]
    metrics = storage.read_bytes(f"{out}/metrics/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["global_step"] for line in metrics] == [1, 2, 3]


@pytest.mark.timeout(180)
def test_publish_during_an_s3_outage_fails_clearly_and_publishing_again_is_complete_and_same(
    s3: SeaweedS3, s3_prefix: str, tmp_path: Path, cache_root: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import engine.lora.publish as publish_module
    from engine.lora.publish import publish_lora

    task = light_task(2)
    checkpoint = run_segment(task, str(tmp_path / "s"), SegmentOptions(
        validate=False, cache_root=cache_root)).checkpoint
    args = {"dataset_hash": "d" * 64, "captions": ["a red circle"], "validation_images": [],
            "metrics_url": None,
            "run_summary": {"run_name": "outage", "started_at": "2026-01-01T00:00:00+00:00",
                            "finished_at": "2026-01-01T01:00:00+00:00"}}
    undisturbed = f"{s3_prefix}/undisturbed"
    publish_lora(checkpoint, task, undisturbed, **args)

    # the server dies after the weight files are written, before the model card
    monkeypatch.setattr(storage, "DEFAULT_RETRY", RetryPolicy(attempts=3, initial_delay_s=0.2))
    real_card = publish_module.render_model_card

    def card_then_outage(*a: Any, **k: Any) -> str:
        s3.stop()
        return real_card(*a, **k)

    monkeypatch.setattr(publish_module, "render_model_card", card_then_outage)
    out = f"{s3_prefix}/run"
    try:
        with pytest.raises(StorageError, match="storage unavailable after 3 attempt"):
            publish_lora(checkpoint, task, out, **args)
    finally:
        s3.start()
    monkeypatch.setattr(publish_module, "render_model_card", real_card)
    partial = _keys_under(s3, out)
    assert "lora/README.md" not in partial and "lora/pytorch_lora_weights.safetensors" in partial

    published = publish_lora(checkpoint, task, out, **args)
    assert published["readme"] == f"{out}/lora/README.md"
    expected = _keys_under(s3, undisturbed)
    assert _keys_under(s3, out) == expected
    first = {k: storage.read_bytes(f"{out}/{k}") for k in expected}
    assert first == {k: storage.read_bytes(f"{undisturbed}/{k}") for k in expected}
    publish_lora(checkpoint, task, out, **args)  # idempotent: the same files, the same bytes
    assert _keys_under(s3, out) == expected
    assert {k: storage.read_bytes(f"{out}/{k}") for k in expected} == first


# -- 4. disk full ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs: room for one tiny-model checkpoint (~180 KiB), not two."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs",
                              str(mount_point)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "test_file_size_limit_... covers a full write with RLIMIT_FSIZE")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False, capture_output=True)
        if subprocess.run(["mountpoint", "-q", str(mount_point)], check=False).returncode == 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_is_a_clear_storage_error_exit_4_without_retries_and_keeps_the_last_checkpoint(
    small_disk: Path, tmp_path: Path, cache_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    out = small_disk / "out"
    task = light_task(3, **{"train_args.checkpointing_steps": 1})
    with caplog.at_level(logging.WARNING, logger="engine.store.storage"):
        run = run_cli(["segment", str(write_task(task, tmp_path / "task.json")),
                       "--output-dir", str(out), "--cache-dir", cache_root, "--no-validation"])
    assert run.code == ExitCode.STORAGE, run.stderr
    assert "no space left on device (ENOSPC); not retried" in run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert [r for r in caplog.records if "retrying" in r.getMessage()] == []  # no retry spam

    first = out / "checkpoints" / "step-00000001"
    assert read_checkpoint(str(first)).global_step == 1  # the last commit is intact
    assert list_committed(str(out / "checkpoints")) == [str(first)]
    assert not list(out.rglob(f"*{TEMP_MARKER}*")), "temporary files left on the full disk"
    assert inspect_output(out).violations == []


FSIZE_CHILD = """
import json, resource, sys
from engine.store.commit import commit_checkpoint, read_checkpoint
from engine.store.storage import StorageError
root = sys.argv[1]
meta = {"task_fingerprint": "fp", "finished": False}
commit_checkpoint(root + "/a", {"w.bin": b"x" * 4096}, meta={**meta, "global_step": 1})
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))  # no file above 64 KiB from here
try:
    commit_checkpoint(root + "/b", {"w.bin": b"x" * 200_000}, meta={**meta, "global_step": 2})
except StorageError as exc:
    kept = read_checkpoint(root + "/a").global_step
    print(json.dumps({"attempts": exc.attempts, "message": str(exc), "kept": kept}))
"""


def test_file_size_limit_is_a_storage_error_at_once_and_keeps_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    """The other real "no room" mechanism, usable without mount rights: RLIMIT_FSIZE makes
    the kernel refuse the write with EFBIG (Python ignores SIGXFSZ)."""
    done = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout, done.stderr
    report = json.loads(done.stdout)
    assert report["attempts"] == 1 and "file too large (EFBIG); not retried" in report["message"]
    assert report["kept"] == 1
    assert not list(tmp_path.rglob(f"*{TEMP_MARKER}*"))


# -- 5. SIGTERM with in-segment checkpoints ----------------------------------------------


@pytest.mark.timeout(240)
def test_sigterm_with_in_segment_checkpoints_commits_exits_5_and_resumes_bitwise(
    tmp_path: Path, cache_root: str
) -> None:
    steps = 30
    task = light_task(steps, **{"train_args.checkpointing_steps": 1,
                                "train_args.checkpoints_total_limit": 3})
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "segment", str(write_task(task, tmp_path / "t.json")),
         "--output-dir", str(out), "--cache-dir", cache_root, "--no-validation"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = line_queue(process.stderr)
        wait_for_line(lines, r"committed .*checkpoints/step-00000003", 180)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)  # stderr is drained by the thread; stdout is one line
        stdout = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == ExitCode.INTERRUPTED
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "signal" and 3 <= summary["global_step"] < steps
    state = inspect_output(out)
    assert state.violations == [] and state.partial_dirs == [] and state.temp_files == []
    assert max(state.committed_steps) <= summary["global_step"]
    assert read_checkpoint(str(out / "checkpoint")).global_step == summary["global_step"]

    opts = {"validate": False, "cache_root": cache_root}
    rest: SegmentResult = run_segment(task, str(tmp_path / "rest"), SegmentOptions(
        **opts, checkpoint=str(out / "checkpoint")))
    reference = run_segment(task, str(tmp_path / "reference"), SegmentOptions(**opts))
    assert rest.finished and rest.start_step == summary["global_step"]
    assert checkpoint_bytes(rest.checkpoint) == checkpoint_bytes(reference.checkpoint)
