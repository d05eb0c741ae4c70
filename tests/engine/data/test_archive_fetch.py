"""engine.data.archive_fetch: dataset archives downloaded or copied, capped, never half-there,
read through the store (retries; an outage is a StorageError) and named only redacted."""

from __future__ import annotations

import http.server
import io
import socket
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import fsspec
import pytest

from engine.data.archive_fetch import fetch
from engine.data.errors import FetchError
from engine.store.redact import redact_url
from tests.support.datasets import FILES, make_zip


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder) of a local HTTP server on a free port."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_downloads_over_http(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, served = http_root
    make_zip(served / "data.zip", FILES)
    got = fetch(f"{base}/data.zip", tmp_path / "dl", progress=False)
    assert got == tmp_path / "dl" / "data.zip"
    assert got.read_bytes() == (served / "data.zip").read_bytes()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["data.zip"]


def test_fetch_404_is_a_clear_permanent_error(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, _ = http_root
    with pytest.raises(FetchError, match="HTTP 404") as info:
        fetch(f"{base}/missing.zip", tmp_path / "dl", progress=False)
    assert not info.value.transient
    assert list((tmp_path / "dl").iterdir()) == []


def test_fetch_unreachable_host_is_a_transient_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match="failed") as info:
        fetch(f"http://127.0.0.1:{port}/x.zip", tmp_path / "dl", progress=False)
    assert info.value.transient


def test_fetch_over_the_size_cap_is_refused(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, served = http_root
    (served / "big.zip").write_bytes(bytes(10_000))
    with pytest.raises(FetchError, match="cap"):
        fetch(f"{base}/big.zip", tmp_path / "dl", progress=False, max_bytes=5_000)
    with pytest.raises(FetchError, match="cap"):
        fetch(str(served / "big.zip"), tmp_path / "dl", progress=False, max_bytes=5_000)
    assert list((tmp_path / "dl").iterdir()) == []


def test_fetch_copies_local_paths_and_fsspec_urls(tmp_path: Path) -> None:
    source = make_zip(tmp_path / "src.zip", FILES)
    data = source.read_bytes()
    assert fetch(str(source), tmp_path / "a", progress=False).read_bytes() == data
    assert fetch(source.as_uri(), tmp_path / "b", progress=False).read_bytes() == data
    fsspec.filesystem("memory").pipe_file("/test-archive/src.zip", data)
    try:
        got = fetch("memory://test-archive/src.zip", tmp_path / "c", progress=False)
        assert got.read_bytes() == data
    finally:
        fsspec.filesystem("memory").rm("/test-archive", recursive=True)


def test_fetch_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="not found"):
        fetch(str(tmp_path / "nope.zip"), tmp_path / "dl", progress=False)


def test_redact_url_hides_credentials() -> None:
    url = "https://user:pw@host:8443/d/x.zip?X-Amz-Signature=abc&X-Amz-Credential=k&part=2"
    shown = redact_url(url)
    assert "pw" not in shown and "user" not in shown and "abc" not in shown
    assert shown.startswith("https://host:8443/d/x.zip?") and "part=2" in shown
    assert redact_url("/local/path.zip") == "/local/path.zip"


def test_fetch_messages_show_urls_through_the_store_redactor(
    tmp_path: Path, http_root: tuple[str, Path]
) -> None:
    base, _ = http_root
    url = f"{base}/missing.zip?X-Amz-Signature=s3cr3t&part=2".replace("://", "://me:pw@")
    with pytest.raises(FetchError, match="HTTP 404") as info:
        fetch(url, tmp_path / "dl", progress=False)
    shown = str(info.value)
    assert "pw" not in shown and "s3cr3t" not in shown and "part=2" in shown


def test_fetch_of_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "folder.zip").mkdir()
    with pytest.raises(FetchError, match="is a folder"):
        fetch(str(tmp_path / "folder.zip"), tmp_path / "dl", progress=False)


def test_fetch_through_the_store_retries_a_broken_chunk_from_its_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient error mid-copy is retried by the store; no byte is lost or doubled."""
    from engine.data import archive_fetch
    from engine.store import storage

    data = bytes(range(256)) * 4096 * 3  # 3 MiB: three chunks
    source = tmp_path / "big.zip"
    source.write_bytes(data)
    real_filesystem = storage.filesystem
    failures = {"left": 1}

    class Flaky:
        def __init__(self, handle: io.BufferedReader) -> None:
            self.handle = handle

        def seek(self, offset: int) -> int:
            return self.handle.seek(offset)

        def read(self, size: int) -> bytes:
            if self.handle.tell() > 0 and failures["left"]:
                failures["left"] -= 1
                self.handle.read(size // 2)  # half a chunk consumed, then the line drops
                raise ConnectionResetError("connection reset by peer")
            return self.handle.read(size)

        def close(self) -> None:
            self.handle.close()

    def flaky_filesystem(url: str):  # noqa: ANN202
        fs, path = real_filesystem(url)

        class FlakyFs:
            def info(self, p: str) -> dict:
                return fs.info(p)

            def open(self, p: str, mode: str) -> Flaky:
                return Flaky(fs.open(p, mode))

            def invalidate_cache(self, p: str) -> None:
                pass

        return FlakyFs(), path

    monkeypatch.setattr(storage, "filesystem", flaky_filesystem)
    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(sleep=lambda s: None))
    got = archive_fetch.fetch(str(source), tmp_path / "dl", progress=False)
    assert failures["left"] == 0
    assert got.read_bytes() == data
