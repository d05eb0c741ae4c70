"""A tar archive read once, front to back, from storage: its regular members in order.

Webdataset shards are read this way when their index is built: one sequential pass, never
a local copy, so a shard set larger than the disk can be indexed. Each member comes with
its data's byte offset inside the tar, so training can later read one member with a ranged
read. Only members the caller asks for are held in memory, one at a time.

A shard is trusted no more than any archive: only regular files are members (links,
devices and directories are ignored, nothing is ever extracted to disk), and a shard that
does not end with tar's end-of-archive block (truncated, or with a corrupt header that
stops the reading early) is refused, naming the shard and the member where it stopped.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from engine.data.errors import DatasetError
from engine.store import storage


@dataclass(frozen=True)
class TarMember:
    """One regular file of a tar: its name, where its data starts, its size, and its bytes
    when they were asked for (``None`` otherwise)."""

    name: str
    offset: int
    size: int
    data: bytes | None


class _ChunkReader:
    """A file-like ``read(n)`` over the chunk iterator of :func:`storage.read_stream`."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = b""
        self._at = 0

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        wanted = n
        while wanted != 0:
            if self._at >= len(self._chunk):
                self._chunk = next(self._chunks, b"")
                self._at = 0
                if not self._chunk:
                    break
            take = len(self._chunk) - self._at if wanted < 0 else min(
                wanted, len(self._chunk) - self._at)
            parts.append(self._chunk[self._at:self._at + take])
            self._at += take
            if wanted > 0:
                wanted -= take
        return b"".join(parts)


class _EndSeen(tarfile.TarInfo):
    """A TarInfo that notes on its archive why reading headers stopped: tarfile ends the
    member list quietly on a zero block (a proper end) and on a truncated or corrupt header
    alike; only the first is a complete shard."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.loraflow_end = err  # type: ignore[attr-defined]
            raise


def tar_members(url: str, wanted: Callable[[str, int], bool],
                name: str | None = None) -> Iterator[TarMember]:
    """The regular members of the tar at ``url``, in order; ``data`` read for those where
    ``wanted(name, size)`` is true.

    ``name`` names the shard in messages (default: ``url``). A missing shard and a broken
    one are :class:`DatasetError`; an outage is the store's ``StorageError`` (exit 4).
    """
    shard = name or storage.redact(url)
    try:
        _size, chunks = storage.read_stream(url)
    except (FileNotFoundError, IsADirectoryError):
        raise DatasetError(f"shard {shard} not found") from None
    last = "(its first header)"
    try:
        try:
            # closed with its chunks below; a `with` would not cover the generator's life
            tar = tarfile.open(  # noqa: SIM115
                fileobj=_ChunkReader(chunks), mode="r|", tarinfo=_EndSeen  # type: ignore[arg-type]
            )
        except tarfile.ReadError as err:
            raise DatasetError(f"shard {shard} is not a tar archive ({err})") from None
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as err:
                raise DatasetError(f"shard {shard}: broken header after member {last} "
                                   f"({err})") from None
            if info is None:
                break
            tar.members.clear()  # stream mode keeps every header otherwise
            if not info.isfile():
                continue
            data = None
            if wanted(info.name, info.size):
                handle = tar.extractfile(info)
                try:
                    data = handle.read() if handle is not None else None
                except tarfile.ReadError:
                    data = None
                if data is None or len(data) != info.size:
                    raise DatasetError(
                        f"shard {shard} is truncated inside member {info.name} "
                        f"({info.size} bytes declared)"
                    )
            last = info.name
            yield TarMember(info.name, info.offset_data, info.size, data)
        end = getattr(tar, "loraflow_end", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            why = "truncated" if isinstance(end, (tarfile.EmptyHeaderError,
                                                  tarfile.TruncatedHeaderError)) else "corrupt"
            raise DatasetError(
                f"shard {shard} is {why} after member {last} (no end-of-archive block)"
            )
    finally:
        chunks.close()
