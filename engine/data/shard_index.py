"""The committed index of a webdataset shard set, and reading samples through it.

A shard set is never copied: preparing it (:mod:`engine.data.shards`) commits only this
index, one folder holding::

    records.jsonl   one line per kept sample: key, shard (its position in the expanded
                    shard list), member, offset and size of the image member inside the
                    tar, its sha256, width, height, captions, and the sample's .json
    manifest.json   written LAST (the store's commit protocol, kind SHARD_INDEX): count,
                    content_hash (sha256 of records.jsonl), source, skipped samples

:class:`ShardDataset` is what training reads: the same questions a prepared dataset
answers (:class:`engine.data.training_data.ExampleSource`), so order, buckets, repeats and
exact resume work unchanged. Unlike :class:`engine.data.layout.PreparedDataset` it keeps
no image bytes: each ``image(i)`` is one ranged read of the shard, checked against the
indexed sha256 (a shard changed since it was indexed is refused, never trained on), so
memory holds the index and nothing that grows with use.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from typing import Any

from PIL import Image

from engine.data.errors import DatasetError
from engine.data.images import decode_image
from engine.data.layout import commit_records, normal_address, read_records
from engine.data.shard_names import shard_urls
from engine.store import storage
from engine.store.commit import (
    FolderKind,
    Manifest,
)
from engine.task.definition import DatasetArgs

#: A shard set's index, as the commit protocol knows it.
SHARD_INDEX = FolderKind(
    "loraflow-shard-index/1", "shard index", {"count": int, "content_hash": str}
)


def commit_index(address: str, records: list[str], meta: dict[str, Any]) -> Manifest:
    """Commit ``records`` (JSON lines) with ``meta`` in the manifest; returns the manifest."""
    return commit_records(address, records, meta, kind=SHARD_INDEX)


def read_index(address: str) -> tuple[Manifest, list[str]] | None:
    """(manifest, record lines) of the committed index at ``address``, None if there is
    none or it does not verify. An outage raises (``StorageError``)."""
    try:
        return _verified(address)
    except DatasetError:
        return None


def _verified(address: str) -> tuple[Manifest, list[str]]:
    return read_records(address, kind=SHARD_INDEX, missing="not indexed, or indexing unfinished")


def open_shards(address: str, args: DatasetArgs) -> ShardDataset:
    """The shard set of ``args`` read through its committed index at ``address``.

    The shard URLs come from ``args`` (expanded again), never from the index: an index
    keeps them only credential-free, for people to read.
    """
    address = normal_address(address)
    try:
        manifest, lines = _verified(address)
    except DatasetError as err:
        raise DatasetError(f"no valid shard index at {address}: {err}") from None
    urls = shard_urls(list(args.shards or []))
    if manifest.get("shard_count") != len(urls):
        raise DatasetError(
            f"shard index at {address} covers {manifest.get('shard_count')} shards, "
            f"the task names {len(urls)}"
        )
    return ShardDataset(address, manifest, lines, urls)


class ShardDataset:
    """Samples of a shard set, read one ranged read at a time (see the module doc).

    Records stay as their JSON lines (parsed when asked) and sizes as two int arrays:
    a small fraction of what parsed dicts would take for a large set.
    """

    def __init__(self, address: str, manifest: Manifest, lines: list[str],
                 urls: list[str]) -> None:
        self.address = address
        self.manifest = manifest
        self._lines = lines
        self._urls = urls
        self._widths = array("l")
        self._heights = array("l")
        for line in lines:
            record = json.loads(line)
            self._widths.append(int(record["width"]))
            self._heights.append(int(record["height"]))

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def __len__(self) -> int:
        return len(self._lines)

    def record(self, i: int) -> dict[str, Any]:
        """Sample ``i``'s index record (key, shard, member, offset, size, sha256, ...)."""
        return dict(json.loads(self._lines[i]))

    def captions(self, i: int) -> list[str]:
        return list(self.record(i)["captions"])

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of sample ``i`` as seen (EXIF orientation applied)."""
        return self._widths[i], self._heights[i]

    def image_bytes(self, i: int) -> bytes:
        """The image member of sample ``i``, read from its shard and checked."""
        record = self.record(i)
        url = self._urls[record["shard"]]
        where = f"shard {storage.redact(url)} member {record['member']}"
        try:
            data = storage.read_range(url, int(record["offset"]), int(record["size"]))
        except FileNotFoundError:
            raise DatasetError(f"{where}: shard missing (moved or deleted since indexed)") from None
        if len(data) != record["size"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise DatasetError(
                f"{where}: not what was indexed (the shard changed); index it again by "
                "preparing into a new data root"
            )
        return data

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` as 8-bit RGB (see :func:`engine.data.images.decode_image`)."""
        return decode_image(self.image_bytes(i))
