"""Task documents are read through the store: retries, redaction, StorageError (exit 4)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest

from engine.errors import ExitCode
from engine.store import storage
from engine.store.storage import RetryPolicy, StorageError
from engine.task.validation import MAX_DOCUMENT_BYTES, TaskValidationError, read_task_text


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://loraflow-tests/{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.fixture
def no_sleep() -> Iterator[list[float]]:
    sleeps: list[float] = []
    previous = storage.set_default_retry_policy(RetryPolicy(sleep=sleeps.append))
    yield sleeps
    storage.set_default_retry_policy(previous)


def test_reads_any_fsspec_url(memory_url: str) -> None:
    storage.write_bytes(f"{memory_url}/task.json", b'\xef\xbb\xbf{"a": 1}')
    assert read_task_text(f"{memory_url}/task.json") == '{"a": 1}'


def test_missing_and_oversized_documents_are_problems(memory_url: str) -> None:
    with pytest.raises(TaskValidationError, match="file not found"):
        read_task_text(f"{memory_url}/nope.json")
    storage.write_bytes(f"{memory_url}/big.json", b" " * (MAX_DOCUMENT_BYTES + 10))
    with pytest.raises(TaskValidationError, match="larger than"):
        read_task_text(f"{memory_url}/big.json")


def test_only_the_cap_is_read(memory_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    limits: list[object] = []
    real = storage.read_bytes

    def recording(url: str, **kwargs: object) -> bytes:
        limits.append(kwargs.get("limit"))
        return real(url, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "read_bytes", recording)
    storage.write_bytes(f"{memory_url}/t.json", b"{}")
    read_task_text(f"{memory_url}/t.json")
    assert limits == [MAX_DOCUMENT_BYTES + 1]


def test_an_outage_is_a_storage_error_after_retries(
    memory_url: str, monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    fs = fsspec.filesystem("memory")

    def down(*args: object, **kwargs: object) -> object:
        raise ConnectionError("connection refused")

    monkeypatch.setattr(fs, "open", down)
    with pytest.raises(StorageError, match="storage unavailable after 5 attempt") as info:
        read_task_text(f"{memory_url}/task.json")
    assert info.value.exit_code == ExitCode.STORAGE and len(no_sleep) == 4


def test_credentials_never_reach_the_message() -> None:
    with pytest.raises(TaskValidationError) as info:
        read_task_text("s3://AKIAEXAMPLE:sup3rsecret@bucket/task.json")
    assert "sup3rsecret" not in str(info.value) and "credentials must not be embedded" in str(
        info.value
    )
