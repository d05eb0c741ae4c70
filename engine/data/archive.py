"""Fetch and unpack dataset archives without trusting them.

A task's ``dataset.url`` points at a zip or tar archive that anyone may have built, so
everything here assumes hostile input:

* :func:`fetch` caps the download size (declared ``Content-Length`` and bytes actually
  received) and writes to a temporary name, renamed only once the whole file is there.
* :func:`extract` recognises the format by its magic bytes (never by the file name),
  checks EVERY member before writing anything (paths that escape, links, device files,
  encrypted members, too many members, zip bombs by declared size and by compression
  ratio), then writes regular files and folders only, counting the bytes actually
  produced because headers can lie. It unpacks into a temporary folder beside ``dest``
  and renames it at the end, so a refusal or a failure leaves nothing behind.

Nested archives are left as plain files: nothing is ever extracted recursively.
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import gzip
import http.client
import lzma
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import fsspec
from tqdm import tqdm

from engine.errors import LoraflowError

GiB = 1024**3
MiB = 1024**2

#: Largest archive :func:`fetch` downloads.
DEFAULT_MAX_DOWNLOAD_BYTES = 20 * GiB
#: Limits of :func:`extract`.
DEFAULT_MAX_MEMBERS = 200_000
DEFAULT_MAX_TOTAL_BYTES = 50 * GiB
DEFAULT_MAX_RATIO = 200
#: Compression ratios are only judged above this size: a few KiB of repeated text can
#: legitimately compress 1000:1, and that is harmless; a bomb needs volume.
RATIO_MIN_BYTES = 1 * MiB

_CHUNK = 1 * MiB
_HTTP_TIMEOUT_S = 60
_MAX_NAME_BYTES = 4096
_MAX_COMPONENT_BYTES = 255
#: Folders that archivers add and that never hold data (macOS resource forks).
_JUNK_TOP_LEVEL = frozenset({"__MACOSX"})
_JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_SECRET_QUERY_KEY = re.compile(
    r"sig|signature|token|credential|secret|password|passwd|auth|key|session|policy",
    re.IGNORECASE,
)


class ArchiveError(LoraflowError, ValueError):
    """An archive (or a member of it) that is refused or cannot be read."""


class FetchError(ArchiveError):
    """A download or copy that failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# -- URLs ------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` without credentials: no user:password, secret-looking query values hidden.

    Used in every message and record, since URLs of private buckets often carry a
    signature or token (presigned S3 URLs) that must not end up in logs or manifests.
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a drive letter)
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    safe_query = [(k, "REDACTED" if _SECRET_QUERY_KEY.search(k) else v) for k, v in query]
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(safe_query), "")
    )


def _download_name(url: str) -> str:
    """A harmless local file name taken from the URL's last path segment."""
    last = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", last)[:100].lstrip(".")
    return cleaned or "download"


# -- fetch -----------------------------------------------------------------------------


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
                _fetch_fsspec(url, out, progress=progress, max_bytes=max_bytes)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _fetch_http(url: str, out: BinaryIO, *, progress: bool, max_bytes: int) -> None:
    shown = redact_url(url)
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
            response, out, shown, total=declared, progress=progress, max_bytes=max_bytes
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


def _fetch_fsspec(url: str, out: BinaryIO, *, progress: bool, max_bytes: int) -> None:
    shown = redact_url(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            raise FetchError(f"{shown} is a folder, not an archive file")
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise FetchError(
                f"copy of {shown} refused: {size} bytes exceeds the cap of {max_bytes}"
            )
        with fs.open(path, "rb") as source:
            _copy_capped(source, out, shown, total=size, progress=progress, max_bytes=max_bytes)
    except FetchError:
        raise
    except FileNotFoundError:
        raise FetchError(f"{shown} not found") from None
    except (OSError, ValueError, ImportError) as err:
        raise FetchError(f"copy of {shown} failed: {err}", transient=True) from None


def _copy_capped(
    source: BinaryIO,
    out: BinaryIO,
    shown: str,
    *,
    total: int | None,
    progress: bool,
    max_bytes: int,
) -> int:
    """Copy ``source`` to ``out`` in chunks, failing as soon as ``max_bytes`` is passed."""
    bar_off = not progress or not sys.stderr.isatty()
    received = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="download", disable=bar_off, file=sys.stderr
    ) as bar:
        while chunk := _read_source(source, shown):
            received += len(chunk)
            if received > max_bytes:
                raise FetchError(f"{shown} refused: more than the cap of {max_bytes} bytes")
            out.write(chunk)
            bar.update(len(chunk))
    return received


def _read_source(source: BinaryIO, shown: str) -> bytes:
    """Next chunk of the download; a broken connection is a transient FetchError."""
    try:
        return source.read(_CHUNK)
    except (OSError, http.client.HTTPException) as err:
        raise FetchError(f"reading {shown} failed: {err}", transient=True) from None


# -- format detection ------------------------------------------------------------------

_COMPRESSED_TAR_OPENERS = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}


def detect_format(archive: Path) -> str:
    """``"zip"``, ``"tar"``, or the tar's compression (``"gzip"``, ``"bz2"``, ``"xz"``).

    Read from the magic bytes; a compressed file must hold a tar (its first decompressed
    block carries the ustar magic), or it is refused.
    """
    with open(archive, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if _is_tar_header(head):
        return "tar"
    compression = _compression_of(head)
    if compression is not None:
        try:
            with _COMPRESSED_TAR_OPENERS[compression](archive, "rb") as stream:
                inner = stream.read(512)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
            raise ArchiveError(f"{archive.name}: corrupt {compression} data ({err})") from None
        if _is_tar_header(inner):
            return compression
        raise ArchiveError(
            f"{archive.name}: not a zip or tar archive ({compression} data that is not a tar)"
        )
    raise ArchiveError(f"{archive.name}: not a zip or tar archive")


def _is_tar_header(block: bytes) -> bool:
    return len(block) >= 512 and block[257:262] == b"ustar"


def _compression_of(head: bytes) -> str | None:
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return None


# -- member checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """One archive entry, reduced to what extraction needs."""

    path: PurePosixPath  # normalised, relative, checked
    is_dir: bool
    size: int  # declared uncompressed size


def _checked_path(name: str) -> PurePosixPath | None:
    """The safe relative path of member ``name``; None for entries that are skipped.

    Refuses what could write outside the destination or mean something else on another
    OS: absolute paths, ``..``, drive letters, backslashes, NUL and control characters.
    """
    if not name or "\x00" in name or any(ord(c) < 32 for c in name):
        raise ArchiveError(f"member {name!r}: empty name or control characters")
    if "\\" in name:
        raise ArchiveError(f"member {name!r}: backslash in path")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"member {name!r}: absolute path")
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        raise ArchiveError(f"member {name[:80]!r}...: path too long")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"member {name!r}: '..' in path")
    if any(len(p.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT_BYTES for p in parts):
        raise ArchiveError(f"member {name!r}: path component too long")
    if not parts:
        return None  # "./" itself
    if parts[0] in _JUNK_TOP_LEVEL or parts[-1] in _JUNK_FILES:
        return None
    return PurePosixPath(*parts)


def _check_all(members: list[_Member], *, max_total_bytes: int) -> None:
    """Checks over the whole member list: duplicates, file/folder clashes, total size."""
    files: set[PurePosixPath] = set()
    dirs: set[PurePosixPath] = set()
    total = 0
    for m in members:
        if m.is_dir:
            dirs.add(m.path)
            continue
        if m.path in files:
            raise ArchiveError(f"member {m.path}: appears twice")
        files.add(m.path)
        total += m.size
        if total > max_total_bytes:
            raise ArchiveError(
                f"member {m.path}: total uncompressed size passes the cap of {max_total_bytes} "
                "bytes (zip bomb?)"
            )
    for path in files:
        parent = path.parent
        while parent != PurePosixPath("."):
            if parent in files:
                raise ArchiveError(f"member {path}: its folder {parent} is also a file")
            parent = parent.parent
        if path in dirs:
            raise ArchiveError(f"member {path}: both a file and a folder")


def _check_ratio(name: object, size: int, compressed: int, max_ratio: float) -> None:
    if size > RATIO_MIN_BYTES and size > max_ratio * max(compressed, 1):
        raise ArchiveError(
            f"member {name}: compression ratio {size / max(compressed, 1):.0f} exceeds "
            f"{max_ratio} (zip bomb?)"
        )


def _check_count(count: int, max_members: int) -> None:
    if count > max_members:
        raise ArchiveError(f"archive has more than {max_members} members")


# -- zip -------------------------------------------------------------------------------


def _zip_members(
    zf: zipfile.ZipFile, *, max_members: int, max_ratio: float
) -> list[tuple[_Member, zipfile.ZipInfo]]:
    infos = zf.infolist()
    _check_count(len(infos), max_members)
    out = []
    for info in infos:
        path = _checked_path(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise ArchiveError(f"member {info.filename!r}: symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"member {info.filename!r}: special file (device, FIFO, socket)")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"member {info.filename!r}: encrypted")
        is_dir = info.is_dir() or kind == stat.S_IFDIR
        if not is_dir:
            _check_ratio(repr(info.filename), info.file_size, info.compress_size, max_ratio)
        if path is not None:
            out.append((_Member(path, is_dir, 0 if is_dir else info.file_size), info))
    return out


def _write_zip(
    zf: zipfile.ZipFile, members: list[tuple[_Member, zipfile.ZipInfo]], root: Path, budget: _Budget
) -> None:
    for member, info in members:
        if member.is_dir:
            _make_dir(root, member.path)
            continue
        with zf.open(info) as source:
            _write_file(root, member, source, budget)


@contextlib.contextmanager
def _zip_errors(archive: Path) -> Iterator[None]:
    """Turn the many ways a broken zip fails into one :class:`ArchiveError`."""
    try:
        yield
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        NotImplementedError,
        lzma.LZMAError,
        RuntimeError,
    ) as err:
        raise ArchiveError(f"{archive.name}: corrupt or unsupported zip ({err})") from None


# -- tar -------------------------------------------------------------------------------


class _CountingReader:
    """A read-only stream that stops once more than ``limit`` bytes came out of it.

    Wraps the decompressed tar stream, so scanning a compressed tar costs at most
    ``limit`` bytes of decompression, and the ratio of decompressed to compressed bytes
    is checked as it grows: a gzip bomb is stopped early, not after 50 GiB.
    """

    def __init__(
        self, stream: BinaryIO, *, limit: int, compressed_size: int | None, max_ratio: float
    ) -> None:
        self._stream = stream
        self._limit = limit
        self._compressed = compressed_size
        self._ratio = max_ratio
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        if self.count > self._limit:
            raise ArchiveError(
                f"archive holds more than the cap of {self._limit} bytes (zip bomb?)"
            )
        if self._compressed is not None:
            _check_ratio("(tar stream)", self.count, self._compressed, self._ratio)
        return data


@contextlib.contextmanager
def _tar_stream(
    archive: Path, compression: str, *, limit: int, max_ratio: float
) -> Iterator[tarfile.TarFile]:
    """The tar as a forward-only stream (``r|``), decompressed through a byte counter."""
    opener = _COMPRESSED_TAR_OPENERS.get(compression, open)
    compressed_size = archive.stat().st_size if compression != "tar" else None
    with opener(archive, "rb") as raw:
        reader = _CountingReader(
            raw, limit=limit, compressed_size=compressed_size, max_ratio=max_ratio
        )
        with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
            yield tf


def _tar_member(info: tarfile.TarInfo) -> _Member | None:
    name = info.name
    if info.issym():
        raise ArchiveError(f"member {name!r}: symbolic link")
    if info.islnk():
        raise ArchiveError(f"member {name!r}: hard link")
    if info.ischr() or info.isblk() or info.isfifo():
        raise ArchiveError(f"member {name!r}: device file or FIFO")
    if info.issparse():
        raise ArchiveError(f"member {name!r}: sparse file")
    if not (info.isreg() or info.isdir()):
        raise ArchiveError(f"member {name!r}: unsupported entry type {info.type!r}")
    path = _checked_path(name)
    if path is None:
        return None
    return _Member(path, info.isdir(), 0 if info.isdir() else info.size)


def _tar_limit(max_members: int, max_total_bytes: int) -> int:
    """Decompressed bytes a tar may hold: the data plus headers and padding per member."""
    return max_total_bytes + (max_members + 2) * 2048


@contextlib.contextmanager
def _tar_errors(archive: Path) -> Iterator[None]:
    """Turn the many ways a broken (compressed) tar fails into one :class:`ArchiveError`."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # a real I/O error (disk full...), not bad data
        raise ArchiveError(f"{archive.name}: corrupt tar ({err})") from None


def _scan_tar(
    archive: Path, compression: str, *, max_members: int, max_total_bytes: int, max_ratio: float
) -> list[_Member]:
    """Every member of the tar, checked one by one; reads the stream once, writes nothing."""
    members: list[_Member] = []
    count = 0
    limit = _tar_limit(max_members, max_total_bytes)
    with (
        _tar_errors(archive),
        _tar_stream(archive, compression, limit=limit, max_ratio=max_ratio) as tf,
    ):
        for info in tf:
            count += 1
            _check_count(count, max_members)
            member = _tar_member(info)
            if member is not None:
                members.append(member)
    return members


def _write_tar(
    archive: Path, compression: str, root: Path, budget: _Budget, *, limit: int, max_ratio: float
) -> None:
    """Second pass over the (already checked) tar stream, writing files and folders."""
    with (
        _tar_errors(archive),
        _tar_stream(archive, compression, limit=limit, max_ratio=max_ratio) as tf,
    ):
        for info in tf:
            member = _tar_member(info)  # same stream, same answers as the scan
            if member is None:
                continue
            if member.is_dir:
                _make_dir(root, member.path)
                continue
            source = tf.extractfile(info)
            if source is None:  # pragma: no cover - regular members always have data
                raise ArchiveError(f"member {member.path}: no data")
            _write_file(root, member, source, budget)


# -- writing ---------------------------------------------------------------------------


class _Budget:
    """Bytes that may still be written, across all members."""

    def __init__(self, total: int) -> None:
        self.left = total

    def spend(self, member: _Member, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ArchiveError(
                f"member {member.path}: total bytes written pass the cap (zip bomb?)"
            )


def _inside(root: Path, rel: PurePosixPath) -> Path:
    """``root / rel``, proven to stay under ``root`` after resolving the real path."""
    target = root.joinpath(*rel.parts)
    resolved_root = root.resolve()
    resolved = target.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise ArchiveError(f"member {rel}: resolves outside the destination")
    return target


def _make_dir(root: Path, rel: PurePosixPath) -> None:
    _inside(root, rel).mkdir(mode=0o755, parents=True, exist_ok=True)


def _write_file(root: Path, member: _Member, source: BinaryIO, budget: _Budget) -> None:
    """Write one member as a new regular file (0644), refusing more bytes than declared."""
    target = _inside(root, member.path)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    written = 0
    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > member.size:
                raise ArchiveError(f"member {member.path}: more data than its declared size")
            budget.spend(member, len(chunk))
            out.write(chunk)
    if written != member.size:
        raise ArchiveError(f"member {member.path}: truncated ({written} of {member.size} bytes)")


# -- extract ---------------------------------------------------------------------------


def extract(
    archive: Path,
    dest: Path,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> Path:
    """Unpack the zip or tar ``archive`` into the new folder ``dest`` and return ``dest``.

    ``dest`` must not exist (or be an empty folder). Every member is checked before the
    first byte is written; files get mode 0644 and folders 0755 whatever the archive says
    (no setuid bits, no ownership, no timestamps). ``__MACOSX/`` and ``.DS_Store``-style
    files are skipped. On any error nothing is left: not ``dest``, not the temporary
    folder. Use :func:`dataset_root` to step into a single top-level folder.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"destination {dest} already exists and is not empty")
    fmt = detect_format(archive)
    budget = _Budget(max_total_bytes)
    if fmt == "zip":
        with _zip_errors(archive), zipfile.ZipFile(archive) as zf:
            planned = _zip_members(zf, max_members=max_members, max_ratio=max_ratio)
            _check_all([m for m, _ in planned], max_total_bytes=max_total_bytes)
            _into_fresh_folder(dest, lambda root: _write_zip(zf, planned, root, budget))
    else:
        members = _scan_tar(
            archive,
            fmt,
            max_members=max_members,
            max_total_bytes=max_total_bytes,
            max_ratio=max_ratio,
        )
        _check_all(members, max_total_bytes=max_total_bytes)
        limit = _tar_limit(max_members, max_total_bytes)
        _into_fresh_folder(
            dest,
            lambda root: _write_tar(archive, fmt, root, budget, limit=limit, max_ratio=max_ratio),
        )
    return dest


def _into_fresh_folder(dest: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a temporary folder beside ``dest``, then rename it to ``dest``.

    The folder only gets its final name when every file is written; on any error it is
    deleted, so a half-extracted archive is never mistaken for a whole one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        if dest.exists():
            dest.rmdir()  # empty: checked by extract()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dataset_root(folder: Path) -> Path:
    """The folder a dataset really starts at: step into a lone top-level folder.

    Archives are often made by zipping a folder, so everything sits under ``name/``.
    When ``folder`` holds exactly one entry and it is a folder, that folder is the root
    (repeatedly: ``a/b/`` becomes ``b``). Hidden entries do not count.
    """
    root = Path(folder)
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
            return root
        root = entries[0]
