"""The prepared dataset on storage: its layout, its commit, and reading it back.

Any fsspec location (local path, ``s3://...``, ``memory://...``) holds::

    images/000000.png   original bytes of each kept image (never re-encoded)
    masks/000000.png    its loss mask's original bytes, for masked subsets (engine.data.masks)
    records.jsonl       one line per kept example: file, captions, width, height, sha256
    manifest.json       written LAST (the commit marker): count, content_hash, source,
                        skipped images with reasons, columns, and every file's sha256

The folder is committed with the store's one protocol (:func:`engine.store.commit.
commit_folder`, kind :data:`DATASET`): the manifest is written last, carries a checksum of
itself, and rewriting a folder uncommits it first, so a half-written dataset is never
read as valid. ``content_hash`` is the sha256 of ``records.jsonl``; since each record
holds its image's sha256 and its captions, it identifies the training data exactly (and
is what caches and checkpoints are keyed by). Readers trust a folder only when its
manifest verifies and the records match ``content_hash``, and check each image's sha256
when it is read. Every byte goes through :mod:`engine.store.storage`: retries, and an
outage is a ``StorageError`` (exit code 4), never "not prepared yet".
"""

from __future__ import annotations

import hashlib
import json
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from engine.data.errors import DatasetError
from engine.data.images import decode_image
from engine.store import storage
from engine.store.commit import (
    CommitError,
    FolderKind,
    Manifest,
    NotCommittedError,
    commit_folder,
    read_folder_manifest,
    read_verified_file,
)

MANIFEST_NAME = "manifest.json"
RECORDS_NAME = "records.jsonl"
IMAGES_DIR = "images"
#: A prepared dataset, as the commit protocol knows it. (Format 1 had a manifest of its
#: own making; such folders are not trusted any more and are simply prepared again.)
DATASET = FolderKind(
    "loraflow-dataset/2", "prepared dataset", {"count": int, "content_hash": str}
)
FORMAT = DATASET.format
#: Names a dataset folder may hold: a folder with anything else is not overwritten.
_OWN_NAMES = frozenset({MANIFEST_NAME, RECORDS_NAME, IMAGES_DIR, "masks", ".manifest.json.tmp"})


@dataclass(frozen=True)
class DatasetManifest:
    """What a prepared dataset is: small and JSON-able, it travels between pipeline steps."""

    address: str
    count: int
    content_hash: str
    skipped: list[dict] = field(default_factory=list)
    empty_captions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "count": self.count,
            "content_hash": self.content_hash,
            "skipped": [dict(s) for s in self.skipped],
            "empty_captions": self.empty_captions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetManifest:
        return cls(
            address=str(data["address"]),
            count=int(data["count"]),
            content_hash=str(data["content_hash"]),
            skipped=[dict(s) for s in data.get("skipped", [])],
            empty_captions=int(data.get("empty_captions", 0)),
        )

    @classmethod
    def of(cls, address: str, manifest: Mapping[str, Any]) -> DatasetManifest:
        """The summary of the committed ``manifest`` of the dataset at ``address``."""
        return cls(
            address=address,
            count=int(manifest["count"]),
            content_hash=str(manifest["content_hash"]),
            skipped=list(manifest.get("skipped", [])),
            empty_captions=int(manifest.get("empty_captions", 0)),
        )


def normal_address(address: str) -> str:
    """URLs without a trailing slash; local paths absolute (the address travels)."""
    if "://" in address:
        return address.rstrip("/")
    return str(Path(address).expanduser().resolve())


def image_file(index: int, extension: str) -> str:
    """Where the ``index``-th kept image is stored, relative to the dataset folder."""
    return f"{IMAGES_DIR}/{index:06d}{extension}"


# -- writing -----------------------------------------------------------------------------


def check_destination(address: str) -> None:
    """Refuse to prepare into a folder that holds files a dataset never writes.

    Called before any heavy work; nothing is deleted here (the commit uncommits the old
    dataset, if any, and removes its stale files).
    """
    names = {name.split("/", 1)[0] for name in storage.list_files(address)}
    names |= {storage.basename(url) for url in storage.list_dirs(address)}
    foreign = sorted(n for n in names - _OWN_NAMES if storage.TEMP_MARKER not in n)
    if foreign:
        raise DatasetError(
            f"{address} holds other files ({', '.join(foreign[:5])}); "
            "refusing to overwrite it: choose an empty or new location"
        )


def commit_dataset(
    address: str, images: Mapping[str, bytes], records: list[str], meta: Mapping[str, Any]
) -> Manifest:
    """Write ``images`` (name -> bytes, read when written), the records and the manifest.

    ``images`` may be a lazy mapping: its bytes are asked for one at a time, as the commit
    writes them, so a large dataset is never held in memory. ``meta`` goes into the
    manifest beside ``count`` and ``content_hash``. Returns the manifest as committed.
    """
    return commit_records(address, records, meta, kind=DATASET, files=images)


def commit_records(address: str, records: list[str], meta: Mapping[str, Any], *,
                   kind: FolderKind, files: Mapping[str, bytes] | None = None) -> Manifest:
    """Commit ``records`` (JSON lines) as ``records.jsonl`` beside ``files``, the manifest
    holding ``count``, ``content_hash`` (sha256 of the records) and ``meta``: the layout
    of a prepared dataset and of a shard index alike."""
    records_bytes = "".join(line + "\n" for line in records).encode("utf-8")
    all_files = ChainMap({RECORDS_NAME: records_bytes}, files or {})  # type: ignore[arg-type]
    document = {
        "count": len(records),
        "content_hash": hashlib.sha256(records_bytes).hexdigest(),
        **meta,
    }
    return commit_folder(address, all_files, document, kind=kind)


# -- reading -----------------------------------------------------------------------------


def read_committed(address: str) -> tuple[Manifest, list[dict]] | None:
    """(manifest, records) if ``address`` holds a committed, intact dataset, else None.

    A storage outage raises (``StorageError``): it must not read as "prepare it again".
    """
    try:
        return _verified(address)
    except DatasetError:
        return None


def _verified(address: str) -> tuple[Manifest, list[dict]]:
    """Read and check manifest and records; raise DatasetError saying what is wrong."""
    manifest, lines = read_records(address, kind=DATASET,
                                   missing="not prepared, or preparation unfinished")
    return manifest, [json.loads(line) for line in lines]


def read_records(address: str, *, kind: FolderKind,
                 missing: str) -> tuple[Manifest, list[str]]:
    """(manifest, record lines) of a folder :func:`commit_records` committed, checked
    against ``content_hash`` and ``count``; else a DatasetError saying what is wrong
    (``missing`` says why there may be no manifest). An outage raises ``StorageError``."""
    try:
        manifest = read_folder_manifest(address, kind=kind)
    except NotCommittedError:
        raise DatasetError(f"no manifest.json ({missing})") from None
    except CommitError as err:
        raise DatasetError(str(err)) from None
    try:
        records_bytes = read_verified_file(address, manifest, RECORDS_NAME, kind=kind)
    except CommitError as err:
        raise DatasetError(
            f"records.jsonl does not match the manifest's content_hash ({err})"
        ) from None
    if hashlib.sha256(records_bytes).hexdigest() != manifest["content_hash"]:
        raise DatasetError("records.jsonl does not match the manifest's content_hash")
    lines = records_bytes.decode("utf-8").splitlines()
    if len(lines) != manifest["count"]:
        raise DatasetError("records.jsonl does not hold 'count' records")
    return manifest, lines


def open_dataset(address: str) -> PreparedDataset:
    """Open the prepared dataset at ``address`` after checking its manifest and records."""
    address = normal_address(address)
    try:
        manifest, records = _verified(address)
    except DatasetError as err:
        raise DatasetError(f"no valid prepared dataset at {address}: {err}") from None
    return PreparedDataset(address, manifest, records)


class PreparedDataset:
    """Read access to a prepared dataset.

    Image bytes are read on first use and KEPT in memory (LoRA datasets are small), so
    later epochs never go back to storage; each is checked against its sha256 on read.
    """

    def __init__(self, address: str, manifest: Manifest, records: list[dict]) -> None:
        self.address = address
        self.manifest = manifest
        self._records = records
        self._bytes: dict[int, bytes] = {}
        self._masks: dict[int, bytes] = {}

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def __len__(self) -> int:
        return len(self._records)

    def record(self, i: int) -> dict[str, Any]:
        """Example ``i``'s record as prepared (file, captions, size, sha256, ...)."""
        return dict(self._records[i])

    def captions(self, i: int) -> list[str]:
        """All captions of example ``i`` (at least one, possibly empty)."""
        return list(self._records[i]["captions"])

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of example ``i`` as seen (EXIF orientation applied)."""
        record = self._records[i]
        return int(record["width"]), int(record["height"])

    def image_bytes(self, i: int) -> bytes:
        """The original file bytes of example ``i``, checked against its sha256.

        The sha256 is the record's (verified with the records, by ``content_hash``), so
        one image is checked without the manifest's file table.
        """
        cached = self._bytes.get(i)
        if cached is not None:
            return cached
        record = self._records[i]
        where = f"{self.address}/{record['file']}"
        try:
            data = storage.read_bytes(storage.join(self.address, record["file"]))
        except FileNotFoundError:
            raise DatasetError(f"{where}: missing (storage corrupted or modified)") from None
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise DatasetError(
                f"{where}: content does not match its sha256 (storage corrupted or modified)"
            )
        self._bytes[i] = data
        return data

    def image(self, i: int) -> Image.Image:
        """Example ``i`` as 8-bit RGB (see :func:`engine.data.images.decode_image`)."""
        return decode_image(self.image_bytes(i))

    def mask(self, i: int) -> Image.Image | None:
        """Example ``i``'s loss mask (:mod:`engine.data.masks`), None when it has none;
        its bytes are checked and kept like the image's."""
        from engine.data.masks import decode_mask, stored_mask_bytes

        record = self._records[i]
        if "mask" not in record:
            return None
        if i not in self._masks:
            self._masks[i] = stored_mask_bytes(self.address, record)
        return decode_mask(self._masks[i])
