"""What a dataset archive may hold: its format by magic bytes, and the rules for members.

Archives are untrusted. :func:`detect_format` recognises zip and (compressed) tar by their
magic bytes, never by the file name. The member rules refuse, before anything is
written, paths that escape or mean something else on another OS, duplicates, file/folder
clashes, too many members, and zip bombs (by declared total size and by compression
ratio). :mod:`engine.data.archive_extract` applies them to every member.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.data.errors import ArchiveError

GiB = 1024**3
MiB = 1024**2

#: Limits of :func:`engine.data.archive_extract.extract`.
DEFAULT_MAX_MEMBERS = 200_000
DEFAULT_MAX_TOTAL_BYTES = 50 * GiB
DEFAULT_MAX_RATIO = 200
#: Compression ratios are only judged above this size: a few KiB of repeated text can
#: legitimately compress 1000:1, and that is harmless; a bomb needs volume.
RATIO_MIN_BYTES = 1 * MiB

_MAX_NAME_BYTES = 4096
_MAX_COMPONENT_BYTES = 255
#: Folders that archivers add and that never hold data (macOS resource forks).
_JUNK_TOP_LEVEL = frozenset({"__MACOSX"})
_JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

# -- format detection ------------------------------------------------------------------

COMPRESSED_TAR_OPENERS = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}


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
            with COMPRESSED_TAR_OPENERS[compression](archive, "rb") as stream:
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
class Member:
    """One archive entry, reduced to what extraction needs."""

    path: PurePosixPath  # normalised, relative, checked
    is_dir: bool
    size: int  # declared uncompressed size


def checked_path(name: str) -> PurePosixPath | None:
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


def check_all(members: list[Member], *, max_total_bytes: int) -> None:
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


def check_ratio(name: object, size: int, compressed: int, max_ratio: float) -> None:
    """Refuse a member (or stream) that inflates more than ``max_ratio`` times."""
    if size > RATIO_MIN_BYTES and size > max_ratio * max(compressed, 1):
        raise ArchiveError(
            f"member {name}: compression ratio {size / max(compressed, 1):.0f} exceeds "
            f"{max_ratio} (zip bomb?)"
        )


def check_count(count: int, max_members: int) -> None:
    """Refuse an archive with more than ``max_members`` entries."""
    if count > max_members:
        raise ArchiveError(f"archive has more than {max_members} members")
