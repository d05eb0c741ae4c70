"""Checkpoints on a real S3 server (SeaweedFS on loopback, see tests/support/s3_server.py).

Covers what only a real server shows: s3fs listing caches, objects changed by another
client, and an outage (server killed) that must end in a clear StorageError within the
retry bound, with the committed data readable again once the server is back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from engine.store import storage
from engine.store.commit import (
    CheckpointError,
    commit_checkpoint,
    is_finished,
    list_committed,
    read_checkpoint,
)
from engine.store.storage import DEFAULT_RETRY, RetryPolicy, StorageError

if TYPE_CHECKING:  # a runtime import would bypass pytest's plugin loading (and rewriting)
    from tests.support.s3_server import SeaweedS3

pytest_plugins = ["tests.support.s3_server"]

FINGERPRINT = "s3-task-fp"
FILES = {
    "unet_lora.safetensors": bytes(range(256)) * 40,
    "optimizer/state.safetensors": b"moments" * 500,
    "state.json": b'{"global_step": 3}',
}


def meta(step: int, *, finished: bool = False) -> dict:
    return {"global_step": step, "task_fingerprint": FINGERPRINT, "finished": finished}


def test_commit_then_read_round_trip_on_s3(s3_prefix: str) -> None:
    url = storage.join(s3_prefix, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(3, finished=True))

    loaded = read_checkpoint(url, expected_fingerprint=FINGERPRINT)

    assert loaded.files == FILES
    assert loaded.global_step == 3
    assert is_finished(url)


def test_corrupt_object_on_s3_is_detected(s3: SeaweedS3, s3_prefix: str) -> None:
    url = storage.join(s3_prefix, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(3))
    data = bytearray(FILES["unet_lora.safetensors"])
    data[100] ^= 0xFF
    other_client = s3.filesystem()
    other_client.pipe_file(storage.join(url, "unet_lora.safetensors"), bytes(data))

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(url)
    assert (
        str(info.value) == f"checkpoint at {url} is corrupt: unet_lora.safetensors sha256 mismatch"
    )


def test_rewrite_on_s3_removes_stale_objects(s3_prefix: str) -> None:
    url = storage.join(s3_prefix, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(3))
    commit_checkpoint(url, {"state.json": b"{}"}, meta=meta(4))

    assert storage.list_files(url) == ["manifest.json", "state.json"]
    assert read_checkpoint(url).files == {"state.json": b"{}"}


def test_reader_sees_checkpoints_written_by_another_client(s3: SeaweedS3, s3_prefix: str) -> None:
    """No stale s3fs listing: a checkpoint appearing after a first listing is found."""
    root = storage.join(s3_prefix, "run")
    commit_checkpoint(storage.join(root, "step-1"), FILES, meta=meta(1))
    assert list_committed(root) == [storage.join(root, "step-1")]  # listing now "seen"

    commit_checkpoint(storage.join(s3_prefix, "elsewhere"), FILES, meta=meta(7))
    other_client = s3.filesystem()
    other_client.copy(
        storage.join(s3_prefix, "elsewhere"), storage.join(root, "step-7"), recursive=True
    )
    other_client.pipe_file(storage.join(root, "step-9", "state.json"), b"uncommitted")

    assert list_committed(root) == [storage.join(root, "step-1"), storage.join(root, "step-7")]
    assert read_checkpoint(storage.join(root, "step-7")).global_step == 7


def test_outage_gives_clear_error_within_bound_and_data_survives_restart(
    s3: SeaweedS3, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = storage.join(s3_prefix, "ckpt")
    commit_checkpoint(url, FILES, meta=meta(5))
    s3.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            read_checkpoint(url)
        elapsed = time.monotonic() - started
        print(f"outage detected after {elapsed:.2f}s: {info.value}")

        waits = sum(DEFAULT_RETRY.delays())
        assert waits <= elapsed < DEFAULT_RETRY.max_total_wait_s + 5.0
        message = str(info.value)
        assert f"cannot read {url}/manifest.json: storage unavailable after 5 attempt(s)" in (
            message
        )
        assert "loraflow-test-secret-key" not in message
        assert "loraflow-test-access-key" not in message

        # Every operation fails loudly, none reads an outage as "no checkpoint".
        monkeypatch.setattr(storage, "DEFAULT_RETRY", RetryPolicy(attempts=2, initial_delay_s=0.1))
        with pytest.raises(StorageError):
            storage.exists(url)
        with pytest.raises(StorageError):
            list_committed(s3_prefix)
        with pytest.raises(StorageError):
            commit_checkpoint(storage.join(s3_prefix, "new"), FILES, meta=meta(6))
    finally:
        s3.start()

    loaded = read_checkpoint(url, expected_fingerprint=FINGERPRINT)
    assert loaded.files == FILES and loaded.global_step == 5


def test_task_documents_are_read_from_s3_through_the_store(s3_prefix: str) -> None:
    from engine.task.validation import TaskValidationError, read_task_text

    storage.write_bytes(storage.join(s3_prefix, "task.json"), b'{"a": 1}')
    storage.write_bytes(storage.join(s3_prefix, "empty.json"), b"")
    assert read_task_text(storage.join(s3_prefix, "task.json")) == '{"a": 1}'
    assert read_task_text(storage.join(s3_prefix, "empty.json")) == ""  # no 416 on a range
    with pytest.raises(TaskValidationError, match="file not found"):
        read_task_text(storage.join(s3_prefix, "missing.json"))
