"""Unpack a dataset archive without trusting it: every member checked before any is written.

:func:`extract` recognises the format by its magic bytes, checks EVERY member with the
rules of :mod:`engine.data.archive_members` (paths that escape, links, device files,
encrypted members, too many members, zip bombs by declared size and by compression ratio),
then writes regular files and folders only, counting the bytes actually produced because
headers can lie. Nested archives are left as plain files: nothing is extracted
recursively.

Why a temporary folder and a rename, not the store's commit protocol: the destination
is a local scratch folder that only this process reads, filled with up to
:data:`~engine.data.archive_members.DEFAULT_MAX_MEMBERS` files streamed out of the
archive, which ``datasets`` then loads as a plain folder. A manifest would add nothing a
rename does not give: :func:`_into_fresh_folder` unpacks beside ``dest`` and renames at
the end, so a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from engine.data.archive_members import (
    COMPRESSED_TAR_OPENERS,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_RATIO,
    DEFAULT_MAX_TOTAL_BYTES,
    Member,
    check_all,
    check_count,
    check_ratio,
    checked_path,
    detect_format,
)
from engine.data.errors import ArchiveError

_CHUNK = 1024**2

# -- zip -------------------------------------------------------------------------------


def _zip_members(
    zf: zipfile.ZipFile, *, max_members: int, max_ratio: float
) -> list[tuple[Member, zipfile.ZipInfo]]:
    infos = zf.infolist()
    check_count(len(infos), max_members)
    out = []
    for info in infos:
        path = checked_path(info.filename)
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
            check_ratio(repr(info.filename), info.file_size, info.compress_size, max_ratio)
        if path is not None:
            out.append((Member(path, is_dir, 0 if is_dir else info.file_size), info))
    return out


def _write_zip(
    zf: zipfile.ZipFile, members: list[tuple[Member, zipfile.ZipInfo]], root: Path, budget: _Budget
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
            check_ratio("(tar stream)", self.count, self._compressed, self._ratio)
        return data


@contextlib.contextmanager
def _tar_stream(
    archive: Path, compression: str, *, limit: int, max_ratio: float
) -> Iterator[tarfile.TarFile]:
    """The tar as a forward-only stream (``r|``), decompressed through a byte counter."""
    opener = COMPRESSED_TAR_OPENERS.get(compression, open)
    compressed_size = archive.stat().st_size if compression != "tar" else None
    with opener(archive, "rb") as raw:
        reader = _CountingReader(
            raw, limit=limit, compressed_size=compressed_size, max_ratio=max_ratio
        )
        with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
            yield tf


def _tar_member(info: tarfile.TarInfo) -> Member | None:
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
    path = checked_path(name)
    if path is None:
        return None
    return Member(path, info.isdir(), 0 if info.isdir() else info.size)


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
) -> list[Member]:
    """Every member of the tar, checked one by one; reads the stream once, writes nothing."""
    members: list[Member] = []
    count = 0
    limit = _tar_limit(max_members, max_total_bytes)
    with (
        _tar_errors(archive),
        _tar_stream(archive, compression, limit=limit, max_ratio=max_ratio) as tf,
    ):
        for info in tf:
            count += 1
            check_count(count, max_members)
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

    def spend(self, member: Member, n: int) -> None:
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


def _write_file(root: Path, member: Member, source: BinaryIO, budget: _Budget) -> None:
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
            check_all([m for m, _ in planned], max_total_bytes=max_total_bytes)
            _into_fresh_folder(dest, lambda root: _write_zip(zf, planned, root, budget))
    else:
        members = _scan_tar(
            archive,
            fmt,
            max_members=max_members,
            max_total_bytes=max_total_bytes,
            max_ratio=max_ratio,
        )
        check_all(members, max_total_bytes=max_total_bytes)
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
