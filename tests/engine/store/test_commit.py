"""Checkpoints are atomic and verified: on local disk (path and file://) and memory://.

Also covers the storage helpers the checkpoints rest on (atomic writes, bounded retries,
no retries on disk full, no credentials in URLs or messages). The same behaviour on a real
S3 server is in test_s3_storage.py.

Why one module over 400 lines: every case here is one contract (a checkpoint is whole or
refused) on every storage kind; split, the storage parametrisation would be repeated.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from engine.store import commit as checkpoint
from engine.store import storage
from engine.store.commit import (
    FINISH_NAME,
    MANIFEST_NAME,
    CheckpointError,
    commit_checkpoint,
    is_finished,
    list_committed,
    read_checkpoint,
    write_finish_marker,
)
from engine.store.storage import RetryPolicy, StorageError

FINGERPRINT = "task-fp-0123456789abcdef"
FILES = {
    "unet_lora.safetensors": b"\x00\x01lora-weights" * 64,
    "optimizer/state.safetensors": b"adam-moments" * 100,
    "state.json": b'{"rng": [1, 2, 3]}',
}


def meta(step: int = 10, *, finished: bool = False, fingerprint: str = FINGERPRINT) -> dict:
    return {"global_step": step, "task_fingerprint": fingerprint, "finished": finished}


@pytest.fixture(params=["path", "file-url", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty storage root in each supported local form."""
    if request.param == "path":
        yield str(tmp_path / "ckpts")
    elif request.param == "file-url":
        yield f"file://{tmp_path / 'ckpts'}"
    else:
        url = f"memory://loraflow-tests/{uuid.uuid4().hex}"
        yield url
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)


def rewrite(url: str, data: bytes) -> None:
    """Tamper with a stored file behind the library's back."""
    fs, path = storage.filesystem(url)
    fs.pipe_file(path, data)


def flip_byte(data: bytes, index: int = 5) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# ---------------------------------------------------------------------------------------------
# Round trip and commit protocol
# ---------------------------------------------------------------------------------------------


def test_commit_then_read_returns_the_same_bytes_and_meta(root: str) -> None:
    url = storage.join(root, "step-10")
    extra = {**meta(10), "epoch": 2, "note": "ünïcode ok"}
    written = commit_checkpoint(url, FILES, meta=extra)

    loaded = read_checkpoint(url, expected_fingerprint=FINGERPRINT)

    assert loaded.files == FILES
    assert loaded.global_step == 10 and loaded.finished is False
    assert loaded.manifest == written
    assert loaded.manifest.global_step == 10
    assert loaded.manifest["epoch"] == 2 and loaded.manifest["note"] == "ünïcode ok"
    assert loaded.manifest["format"] == "loraflow-checkpoint/1"
    entry = loaded.manifest.files["unet_lora.safetensors"]
    assert entry["size"] == len(FILES["unet_lora.safetensors"])
    assert len(entry["sha256"]) == 64


def test_manifest_is_written_last(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = storage.join(root, "ckpt")
    writes: list[str] = []
    real_write = storage.write_bytes

    def recording_write(target: str, data: bytes, **kwargs: object) -> None:
        writes.append(storage.basename(target))
        real_write(target, data, **kwargs)

    monkeypatch.setattr(storage, "write_bytes", recording_write)
    commit_checkpoint(url, FILES, meta=meta(finished=True))

    assert writes[-2:] == [MANIFEST_NAME, FINISH_NAME]
    assert sorted(writes[:-2]) == sorted(storage.basename(name) for name in FILES)


def test_commit_interrupted_before_manifest_is_not_a_checkpoint(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = storage.join(root, "ckpt")

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed before the manifest was written")

    monkeypatch.setattr(checkpoint, "_write_manifest", crash)
    with pytest.raises(RuntimeError):
        commit_checkpoint(url, FILES, meta=meta(finished=True))

    assert storage.exists(storage.join(url, "unet_lora.safetensors"))  # data did land
    with pytest.raises(CheckpointError, match=r"no committed checkpoint at .*ckpt") as info:
        read_checkpoint(url)
    assert "manifest.json missing: the write never finished" in str(info.value)
    assert not is_finished(url)
    assert list_committed(root) == []


def test_missing_directory_is_reported_as_no_committed_checkpoint(root: str) -> None:
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        read_checkpoint(storage.join(root, "never-written"))


# ---------------------------------------------------------------------------------------------
# Corruption is detected, with a message that says what and where
# ---------------------------------------------------------------------------------------------


def test_flipped_byte_is_detected_naming_the_file(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta())
    target = storage.join(url, "unet_lora.safetensors")
    rewrite(target, flip_byte(FILES["unet_lora.safetensors"]))

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(url)
    assert str(info.value) == (
        f"checkpoint at {url} is corrupt: unet_lora.safetensors sha256 mismatch"
    )


def test_truncated_file_is_detected_as_size_mismatch(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta())
    data = FILES["optimizer/state.safetensors"]
    rewrite(storage.join(url, "optimizer/state.safetensors"), data[:-7])

    with pytest.raises(CheckpointError, match=r"corrupt: optimizer/state.safetensors size") as e:
        read_checkpoint(url)
    assert f"manifest says {len(data)} bytes, found {len(data) - 7}" in str(e.value)


def test_missing_file_is_detected(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta())
    storage.remove(storage.join(url, "state.json"))

    with pytest.raises(CheckpointError, match=r"corrupt: state.json is missing"):
        read_checkpoint(url)


def test_hand_edited_manifest_is_detected(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(10))
    manifest_url = storage.join(url, MANIFEST_NAME)
    document = json.loads(storage.read_bytes(manifest_url))
    document["global_step"] = 99  # valid JSON, plausible value: only the checksum tells
    rewrite(manifest_url, json.dumps(document).encode())

    with pytest.raises(CheckpointError, match=r"corrupt: manifest.json was modified"):
        read_checkpoint(url)


def test_manifest_listing_wrong_hash_is_detected(root: str) -> None:
    """A self-consistent manifest that disagrees with a file still fails on that file."""
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta())
    manifest_url = storage.join(url, MANIFEST_NAME)
    document = json.loads(storage.read_bytes(manifest_url))
    document["files"]["state.json"]["sha256"] = "0" * 64
    document["manifest_sha256"] = checkpoint._manifest_checksum(document)
    rewrite(manifest_url, json.dumps(document).encode())

    with pytest.raises(CheckpointError, match=r"corrupt: state.json sha256 mismatch"):
        read_checkpoint(url)


def test_invalid_json_manifest_is_detected(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta())
    rewrite(storage.join(url, MANIFEST_NAME), b'{"format": "loraflow-checkpoint/1", "fi')

    with pytest.raises(CheckpointError, match=r"invalid manifest: manifest.json is not valid JSON"):
        read_checkpoint(url)


def test_wrong_fingerprint_is_refused(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(fingerprint="old-task"))

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(url, expected_fingerprint="new-task")
    assert str(info.value) == (
        f"checkpoint at {url} belongs to a different task (model/dataset/LoRA shape changed): "
        "fingerprint old-task != new-task"
    )
    assert read_checkpoint(url).task_fingerprint == "old-task"  # no expectation: readable


# ---------------------------------------------------------------------------------------------
# Rewriting a checkpoint directory
# ---------------------------------------------------------------------------------------------


def test_rewrite_removes_old_manifest_before_touching_data(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(10, finished=True))
    events: list[tuple[str, str]] = []
    real_write, real_remove = storage.write_bytes, storage.remove

    def write(target: str, data: bytes, **kwargs: object) -> None:
        events.append(("write", storage.basename(target)))
        real_write(target, data, **kwargs)

    def remove(target: str, **kwargs: object) -> None:
        events.append(("remove", storage.basename(target)))
        real_remove(target, **kwargs)

    monkeypatch.setattr(storage, "write_bytes", write)
    monkeypatch.setattr(storage, "remove", remove)
    commit_checkpoint(url, {"state.json": b"{}"}, meta=meta(20))

    assert events[:2] == [("remove", FINISH_NAME), ("remove", MANIFEST_NAME)]
    assert events[-1] == ("write", MANIFEST_NAME)
    assert read_checkpoint(url).global_step == 20


def test_rewrite_interrupted_leaves_no_checkpoint_rather_than_a_mix(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(10, finished=True))
    new_files = {**FILES, "unet_lora.safetensors": b"newer weights"}

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("preempted while writing data")

    monkeypatch.setattr(checkpoint, "_write_data_files", crash)
    with pytest.raises(RuntimeError):
        commit_checkpoint(url, new_files, meta=meta(20, finished=True))

    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        read_checkpoint(url)
    assert not is_finished(url)


def test_stale_files_from_earlier_writes_are_removed(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(10))
    leftover = storage.join(url, f".unet_lora.safetensors{storage.TEMP_MARKER}deadbeef")
    storage.write_bytes(leftover, b"half a write")
    storage.write_bytes(storage.join(url, "extra/old.bin"), b"from an aborted attempt")

    commit_checkpoint(url, {"state.json": b"{}"}, meta=meta(11))

    assert storage.list_files(url) == [MANIFEST_NAME, "state.json"]
    assert read_checkpoint(url).files == {"state.json": b"{}"}


def test_invalid_input_fails_before_the_existing_checkpoint_is_touched(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(10))
    bad_calls = [
        ({"../escape": b""}, meta()),
        ({"a/b/c": b""}, meta()),
        ({MANIFEST_NAME: b"{}"}, meta()),
        ({"x": b""}, {"global_step": 1, "finished": False}),
        ({"x": b""}, {**meta(), "global_step": "10"}),
        ({"x": b""}, {**meta(), "files": {}}),
        ({"x": b""}, {**meta(), "when": object()}),
    ]
    for files, bad_meta in bad_calls:
        with pytest.raises(ValueError):
            commit_checkpoint(url, files, meta=bad_meta)
    assert read_checkpoint(url).files == FILES


# ---------------------------------------------------------------------------------------------
# FINISH marker
# ---------------------------------------------------------------------------------------------


def test_finish_marker_follows_meta_finished(root: str) -> None:
    url = storage.join(root, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(10, finished=False))
    assert not is_finished(url)
    with pytest.raises(CheckpointError, match="not finished"):
        write_finish_marker(url)

    commit_checkpoint(url, FILES, meta=meta(100, finished=True))
    assert is_finished(url)
    assert storage.read_bytes(storage.join(url, FINISH_NAME)) == b""
    assert read_checkpoint(url).finished is True

    commit_checkpoint(url, FILES, meta=meta(100, finished=False))  # e.g. task extended
    assert not is_finished(url)


def test_finish_marker_needs_a_committed_checkpoint(root: str) -> None:
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        write_finish_marker(storage.join(root, "nothing-here"))


# ---------------------------------------------------------------------------------------------
# list_committed
# ---------------------------------------------------------------------------------------------


def test_list_committed_orders_by_step_and_skips_uncommitted(root: str) -> None:
    for name, step in [("b", 5), ("a", 9), ("c", 2), ("tie-2", 5)]:
        commit_checkpoint(storage.join(root, name), FILES, meta=meta(step))
    storage.write_bytes(storage.join(root, "half", "unet_lora.safetensors"), b"no manifest")
    storage.write_bytes(storage.join(root, "broken", MANIFEST_NAME), b"not json")
    storage.write_bytes(storage.join(root, "loose-file.txt"), b"not a directory")

    committed = list_committed(root)

    assert committed == [storage.join(root, n) for n in ["c", "b", "tie-2", "a"]]
    assert read_checkpoint(committed[-1]).global_step == 9


def test_list_committed_of_missing_root_is_empty(root: str) -> None:
    assert list_committed(storage.join(root, "nope")) == []


# ---------------------------------------------------------------------------------------------
# Storage helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("/data/run", ("ckpt", "a.bin"), "/data/run/ckpt/a.bin"),
        ("/data/run/", ("/ckpt/",), "/data/run/ckpt"),
        ("file:///data/run", ("ckpt",), "file:///data/run/ckpt"),
        ("s3://bucket", ("run", "ckpt"), "s3://bucket/run/ckpt"),
        ("s3://bucket/run/", ("", "ckpt"), "s3://bucket/run/ckpt"),
        ("memory://", ("x", "y"), "memory://x/y"),
        ("relative", ("x",), "relative/x"),
    ],
)
def test_join_handles_paths_and_urls(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "file.bin"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]


def test_local_write_failure_keeps_old_content_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.bin"
    storage.write_bytes(str(target), b"old")
    fs, _ = storage.filesystem(str(target))

    def failing_mv(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "mv", failing_mv)
    with pytest.raises(StorageError):
        storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_disk_full_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def disk_full(*args: object) -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_put_once", disk_full)
    sleeps: list[float] = []
    with pytest.raises(StorageError) as info:
        storage.write_bytes(str(tmp_path / "x"), b"data", retry=RetryPolicy(sleep=sleeps.append))
    assert calls == [1] and sleeps == []
    assert info.value.errno == errno.ENOSPC
    assert "no space left on device (ENOSPC); not retried" in str(info.value)
    assert str(tmp_path / "x") in str(info.value)


def test_transient_errors_are_retried_with_bounded_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: object) -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(storage, "_put_once", unreachable)
    sleeps: list[float] = []
    policy = RetryPolicy(sleep=sleeps.append)
    with pytest.raises(StorageError, match=r"storage unavailable after 5 attempt\(s\)") as info:
        storage.write_bytes(str(tmp_path / "x"), b"data", retry=policy)
    assert sleeps == [0.5, 1.0, 2.0, 4.0]
    assert sum(sleeps) <= policy.max_total_wait_s
    assert info.value.attempts == 5
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_retry_wait_is_capped_by_total_budget() -> None:
    policy = RetryPolicy(attempts=8, initial_delay_s=1.0, multiplier=3.0, max_total_wait_s=10.0)
    assert policy.delays() == [1.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0]


def test_transient_error_then_success_returns_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x"
    target.write_bytes(b"payload")
    fs, _ = storage.filesystem(str(target))
    real_cat = fs.cat_file
    failures = [TimeoutError("read timed out")]

    def flaky_cat(path: str, *args: object, **kwargs: object) -> bytes:
        if failures:
            raise failures.pop()
        return real_cat(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", flaky_cat)
    sleeps: list[float] = []
    assert storage.read_bytes(str(target), retry=RetryPolicy(sleep=sleeps.append)) == b"payload"
    assert sleeps == [0.5]


def test_missing_file_is_an_answer_not_a_retry(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing"), retry=RetryPolicy(sleep=sleeps.append))
    assert sleeps == []
    assert storage.exists(str(tmp_path / "missing")) is False


def test_credentials_in_urls_are_refused_and_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="credentials must not be embedded") as info:
        storage.read_bytes("s3://AKIAEXAMPLE:sup3rsecret@bucket/ckpt/manifest.json")
    assert "sup3rsecret" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    text = storage.redact("GET https://u:p@host/x?secret=abc&key=def failed: env-secret-value")
    assert text == "GET https://***@host/x?secret=***&key=*** failed: ***"


def test_storage_error_survives_pickling_between_processes() -> None:
    error = StorageError(
        "cannot write s3://b/k: disk full", url="s3://b/k", attempts=1, cause_errno=errno.ENOSPC
    )
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, StorageError) and isinstance(copy, OSError)
    assert (str(copy), copy.url, copy.attempts, copy.errno) == (
        "cannot write s3://b/k: disk full",
        "s3://b/k",
        1,
        errno.ENOSPC,
    )
    assert str(pickle.loads(pickle.dumps(CheckpointError("bad at x")))) == "bad at x"


def test_default_retry_policy_is_configurable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: object) -> None:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(storage, "_put_once", unreachable)
    sleeps: list[float] = []
    previous = storage.set_default_retry_policy(
        RetryPolicy(attempts=3, initial_delay_s=0.25, sleep=sleeps.append)
    )
    try:
        with pytest.raises(StorageError, match=r"after 3 attempt\(s\)"):
            commit_checkpoint(str(tmp_path / "ckpt"), FILES, meta=meta())
    finally:
        storage.set_default_retry_policy(previous)
    assert sleeps == [0.25, 0.5]
    assert storage.DEFAULT_RETRY is previous
