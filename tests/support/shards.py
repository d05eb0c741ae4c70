"""Builders for webdataset shards: tar files whose members sharing a key form a sample."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

from tests.support.datasets import png


def sample(key: str, *, image: bytes | None = None, caption: str | bytes | None = "a cat",
           meta: dict[str, Any] | None = None, ext: str = "png") -> list[tuple[str, bytes]]:
    """The members of one sample: ``key.png`` (a small PNG unless given), ``key.txt``,
    and ``key.json`` when ``meta`` is given; ``image=b""``/``caption=None`` leave one out."""
    members = []
    if image != b"":
        members.append((f"{key}.{ext}", image if image is not None else png()))
    if caption is not None:
        members.append((f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode()))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def shard_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar (as webdataset writes them, in order) holding ``members``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def shard_of(keys: range, **options: Any) -> bytes:
    """A shard with one default sample per key (``key`` as ``{k:06d}``)."""
    return shard_bytes([m for k in keys for m in sample(f"{k:06d}", **options)])
