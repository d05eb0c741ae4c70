"""Fetch a dataset archive without trusting it: capped in size, never seen half-written.

A task's ``dataset.url`` points at a zip or tar archive that anyone may have built, on
any web server or storage. :func:`fetch` caps the download (the declared size and the
bytes actually received) and writes to a temporary name, renamed only once the whole
file is there. http(s) URLs are downloaded here (``user:password@`` becomes HTTP Basic
authentication that a redirect never receives); every other URL or local path is read
through the store (:func:`engine.store.storage.read_stream`: retries, and storage that
stays down is a ``StorageError``, exit code 4). Messages name URLs only as the store's
redactor shows them. Unpacking is :mod:`engine.data.archive_extract`'s job.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from engine.data.errors import FetchError
from engine.store import storage
from engine.store.redact import redact

GiB = 1024**3
MiB = 1024**2

#: Largest archive :func:`fetch` downloads.
DEFAULT_MAX_DOWNLOAD_BYTES = 20 * GiB

_CHUNK = 1 * MiB
_HTTP_TIMEOUT_S = 60


def fetch(
    url: str,
    dest_dir: Path,
    *,
    progress: bool = True,
    max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
) -> Path:
    """Download (http/https) or copy (any fsspec URL or local path) ``url`` into ``dest_dir``.

    Returns the path of the complete file. Data streams to a hidden temporary file that
    is renamed only when complete, so a crash never leaves a file that looks finished.
    The progress bar goes to stderr and only when ``progress`` is set and stderr is a
    terminal (logs of a worker should not fill with bar redraws).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / _download_name(url)
    fd, tmp_name = tempfile.mkstemp(prefix=".fetch-", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
            if scheme in ("http", "https"):
                _fetch_http(url, out, progress=progress, max_bytes=max_bytes)
            else:
                _fetch_stored(url, out, progress=progress, max_bytes=max_bytes)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _download_name(url: str) -> str:
    """A harmless local file name taken from the URL's last path segment."""
    last = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", last)[:100].lstrip(".")
    return cleaned or "download"


# -- http(s) ---------------------------------------------------------------------------


def _fetch_http(url: str, out: BinaryIO, *, progress: bool, max_bytes: int) -> None:
    shown = redact(url)
    request = _http_request(url)
    try:
        response = urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S)  # noqa: S310
    except urllib.error.HTTPError as err:
        raise FetchError(
            f"download of {shown} failed: HTTP {err.code} {err.reason}",
            transient=err.code >= 500 or err.code in (408, 429),
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise FetchError(f"download of {shown} failed: {reason}", transient=True) from None
    with response:
        declared = _content_length(response.headers.get("Content-Length"))
        if declared is not None and declared > max_bytes:
            raise FetchError(
                f"download of {shown} refused: {declared} bytes exceeds the cap of {max_bytes}"
            )
        received = _copy_capped(
            _http_chunks(response, shown), out, shown,
            total=declared, progress=progress, max_bytes=max_bytes,
        )
    if declared is not None and received != declared:
        raise FetchError(
            f"download of {shown} incomplete: got {received} of {declared} bytes",
            transient=True,
        )


def _http_request(url: str) -> urllib.request.Request:
    """A GET for ``url``; ``user:password@`` in it becomes HTTP Basic authentication.

    The credentials go in an unredirected header: a redirect to another host must not
    receive them.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url, headers={"User-Agent": "loraflow"})
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    bare = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    request = urllib.request.Request(bare, headers={"User-Agent": "loraflow"})
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def _content_length(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _http_chunks(response: BinaryIO, shown: str) -> Iterator[bytes]:
    """The response body in chunks; a broken connection is a transient FetchError."""
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(f"reading {shown} failed: {err}", transient=True) from None
        if not chunk:
            return
        yield chunk


# -- everything else: through the store ------------------------------------------------


def _fetch_stored(url: str, out: BinaryIO, *, progress: bool, max_bytes: int) -> None:
    """Copy a file from any storage the store reaches (local, s3://, memory://...)."""
    shown = redact(url)
    try:
        size, chunks = storage.read_stream(url, chunk_size=_CHUNK)
    except IsADirectoryError:
        raise FetchError(f"{shown} is a folder, not an archive file") from None
    except FileNotFoundError:
        raise FetchError(f"{shown} not found") from None
    except storage.StorageError:
        raise  # storage down: exit code 4, not a bad dataset
    except (OSError, ValueError, ImportError) as err:  # no such protocol, bad URL...
        raise FetchError(f"copy of {shown} failed: {err}", transient=True) from None
    with contextlib.closing(chunks):
        if size is not None and size > max_bytes:
            raise FetchError(
                f"copy of {shown} refused: {size} bytes exceeds the cap of {max_bytes}"
            )
        try:
            _copy_capped(chunks, out, shown, total=size, progress=progress, max_bytes=max_bytes)
        except FileNotFoundError:
            raise FetchError(f"{shown} not found") from None


def _copy_capped(
    chunks: Iterable[bytes],
    out: BinaryIO,
    shown: str,
    *,
    total: int | None,
    progress: bool,
    max_bytes: int,
) -> int:
    """Copy ``chunks`` to ``out``, failing as soon as ``max_bytes`` is passed."""
    bar_off = not progress or not sys.stderr.isatty()
    received = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="download", disable=bar_off, file=sys.stderr
    ) as bar:
        for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise FetchError(f"{shown} refused: more than the cap of {max_bytes} bytes")
            out.write(chunk)
            bar.update(len(chunk))
    return received
