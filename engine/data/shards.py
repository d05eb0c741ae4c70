"""Webdataset shards, prepared by streaming: each shard read once, only an index kept.

A webdataset shard is a tar whose members sharing a key form one sample:
``0001.jpg`` (or ``.jpeg``/``.png``/``.webp``) + ``0001.txt`` (the caption;
``dataset.caption_extension``) + optional ``0001.json`` (metadata, which
``dataset.filters`` test). Preparing a shard set (:func:`prepare_shards`) reads every shard
front to back through the store (:mod:`engine.data.tar_stream`), checks each sample as a
prepared dataset checks its images (same image policy, so an indexed image always decodes
later), applies the filters, and commits the index (:mod:`engine.data.shard_index`) — not
the images. Local disk holds the index; memory holds one sample at a time.

Bad samples never stop preparation: a sample without image or caption, a caption that is
not UTF-8, metadata that is not a JSON object, an image outside the policy: each is listed
in the manifest's ``skipped`` (``{"file": "0003.tar/0001", "reason": ...}``, shard by its
base name, never a local path). A broken shard (truncated mid-member, a corrupt header), a
filter field missing under ``missing: error`` or a filter comparing unlike kinds stop it
with a :class:`DatasetError` naming shard and member; nothing is committed. An unreachable
shard is the store's ``StorageError`` (exit code 4).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from engine.data.buckets import Bucket, nearest_bucket
from engine.data.captions import has_text
from engine.data.errors import DatasetError
from engine.data.filters import passes
from engine.data.identity import canonical_json, source_record
from engine.data.images import MAX_IMAGE_BYTES, check_image, skip_reason
from engine.data.layout import DatasetManifest, check_destination, normal_address
from engine.data.shard_index import commit_index, read_index
from engine.data.shard_names import shard_urls
from engine.data.tar_stream import TarMember, tar_members
from engine.store import storage
from engine.store.redact import redact_url
from engine.task.definition import DatasetArgs

#: Image members of a sample, in the order one is chosen when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Largest caption or metadata member read, in bytes.
MAX_TEXT_BYTES = 1024**2


@dataclass
class _Index:
    """What preparing found: the kept samples' records, the skipped ones with reasons."""

    records: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    filtered_out: int = 0
    empty_captions: int = 0


def prepare_shards(args: DatasetArgs, dest: str, *, progress: bool = False,
                   buckets: tuple[Bucket, ...] | None = None) -> DatasetManifest:
    """Index the shard set of ``args`` at ``dest`` (local path or fsspec URL).

    Idempotent: an index at ``dest`` of the same source is returned as is. ``buckets``:
    as for :func:`engine.data.dataset.prepare_dataset` (each record gets its ``bucket``).
    """
    if not args.shards:
        raise DatasetError("dataset.shards is empty")
    address = normal_address(dest)
    source = _source(args, buckets)
    existing = read_index(address)
    if existing is not None and existing[0].get("source") == source:
        return DatasetManifest.of(address, existing[0])
    urls = shard_urls(list(args.shards))
    check_destination(address)
    index = _Index()
    from tqdm import tqdm

    for k, url in enumerate(tqdm(urls, desc="indexing shards", disable=not progress)):
        _index_shard(k, url, args, index, buckets)
    if not index.records:
        reasons = sorted({s["reason"] for s in index.skipped})[:5]
        raise DatasetError(
            f"no usable sample in {len(urls)} shard(s) ({len(index.skipped)} skipped, "
            f"{index.filtered_out} filtered out; e.g. {'; '.join(reasons) or '-'})"
        )
    if index.empty_captions == len(index.records):
        raise DatasetError("no kept sample of the shards has a non-empty caption")
    meta = {
        "source": source,
        "shard_count": len(urls),
        "skipped": index.skipped,
        "filtered_out": index.filtered_out,
        "empty_captions": index.empty_captions,
    }
    manifest = commit_index(address, index.records, meta)
    return DatasetManifest.of(address, manifest)


def _source(args: DatasetArgs, buckets: tuple[Bucket, ...] | None) -> dict[str, Any]:
    """The credential-free source record (each shard pattern redacted like a url)."""
    record = source_record(args, buckets)
    record["shards"] = [redact_url(p) for p in record["shards"]]
    return record


def _index_shard(k: int, url: str, args: DatasetArgs, index: _Index,
                 buckets: tuple[Bucket, ...] | None) -> None:
    shard = storage.redact(url)
    label = storage.basename(url)
    caption_ext = args.caption_extension.lstrip(".").lower()
    for key, members in _samples(url, shard, caption_ext):
        where = f"{label}/{key}"
        try:
            record = _sample_record(k, key, members, caption_ext, args, shard)
        except _Skip as skip:
            index.skipped.append({"file": where, "reason": str(skip)})
            continue
        if record is None:
            index.filtered_out += 1
            continue
        record["file"] = f"{label}/{record['member']}"
        if buckets is not None:
            record["bucket"] = list(nearest_bucket((record["width"], record["height"]), buckets))
        index.records.append(canonical_json(record))
        index.empty_captions += not has_text(record["captions"])


class _Skip(Exception):  # noqa: N818 - a reason, not a failure
    """Why one sample is left out (its message goes into the manifest)."""


def _split(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member, as webdataset splits it: at the first dot of the base
    name (``a/0001.seg.png`` -> ``a/0001``, ``seg.png``); None for names without one."""
    folder, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(folder, stem), ext.lower()


def _samples(url: str, shard: str,
             caption_ext: str) -> Iterator[tuple[str, dict[str, TarMember]]]:
    """(key, {extension: member}) of each sample of one shard, in order."""
    wanted_ext = {*IMAGE_EXTENSIONS, caption_ext, "json"}

    def wanted(name: str, size: int) -> bool:
        split = _split(name)
        if split is None or split[1] not in wanted_ext:
            return False
        limit = MAX_IMAGE_BYTES if split[1] in IMAGE_EXTENSIONS else MAX_TEXT_BYTES
        return size <= limit

    seen: set[str] = set()
    key: str | None = None
    members: dict[str, TarMember] = {}
    for member in tar_members(url, wanted, shard):
        split = _split(member.name)
        if split is None:
            continue
        if split[0] != key:
            if key is not None:
                yield key, members
            key, members = split[0], {}
            if key in seen:
                raise DatasetError(
                    f"shard {shard}: sample {key} appears twice (its members are not "
                    "next to each other)"
                )
            seen.add(key)
        members[split[1]] = member
    if key is not None:
        yield key, members


def _sample_record(k: int, key: str, members: dict[str, TarMember], caption_ext: str,
                   args: DatasetArgs, shard: str) -> dict[str, Any] | None:
    """The index record of one sample; None when the filters leave it out; _Skip why it
    cannot be used."""
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        raise _Skip(f"no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
    caption_member = members.get(caption_ext)
    if caption_member is None:
        raise _Skip(f"no caption member (.{caption_ext})")
    caption = _text(caption_member, "caption")
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(_text(members["json"], "metadata"))
        except ValueError as err:
            raise _Skip(f"metadata {members['json'].name} is not valid JSON ({err})") from None
        if not isinstance(meta, dict):
            raise _Skip(f"metadata {members['json'].name} is not a JSON object")
    where = (f"shard {shard} member {members['json'].name}" if "json" in members
             else f"shard {shard} sample {key} (it has no .json)")
    if args.filters and not passes(meta, args.filters, where=where):
        return None
    if image.data is None:
        raise _Skip(f"image {image.name} of {image.size} bytes exceeds {MAX_IMAGE_BYTES}")
    try:
        _ext, width, height = check_image(image.data)
    except Exception as err:  # untrusted bytes: PIL raises many types; skip, never crash
        raise _Skip(f"{image.name}: {skip_reason(err)}") from None
    record: dict[str, Any] = {
        "key": key,
        "shard": k,
        "member": image.name,
        "offset": image.offset,
        "size": image.size,
        "sha256": hashlib.sha256(image.data).hexdigest(),
        "width": width,
        "height": height,
        "captions": [caption.strip()],
    }
    if meta:
        record["meta"] = meta
    return record


def _text(member: TarMember, what: str) -> str:
    if member.data is None:
        raise _Skip(f"{what} {member.name} of {member.size} bytes exceeds {MAX_TEXT_BYTES}")
    try:
        return member.data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Skip(f"{what} {member.name} is not UTF-8") from None
