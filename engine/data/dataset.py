"""Prepare a dataset once into a normalized, content-hashed form (:func:`prepare_dataset`).

Why a normalized form: sources come in many shapes, may be untrusted, and may be slow or
gone later. Preparing loads the source (:mod:`engine.data.sources`), checks its columns
and captions (:mod:`engine.data.captions`) before any image work, checks every image
against the image policy (:mod:`engine.data.images`), and commits one simple layout to
any fsspec location (:mod:`engine.data.layout`), which is all that training reads.

Bad images never stop preparation: each is skipped and listed in the manifest's
``skipped`` as ``{"index": i, "file": name, "reason": ...}`` (i = row of the source split;
``file`` where the row names one); so is an image of a caption folder whose caption file
is missing or unreadable (:mod:`engine.data.caption_files`). A dataset with no usable
image at all is an error. Rows that ``DatasetArgs.filters`` leave out are counted
(``filtered_out``), before any image work.

``datasets`` writes its arrow cache into a scratch folder under ``work_dir`` (removed at
the end), never into ``~/.cache``.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.buckets import Bucket, nearest_bucket
from engine.data.captions import (
    check_columns,
    has_text,
    normalized_captions,
    with_caption_column,
)
from engine.data.errors import DatasetError
from engine.data.identity import canonical_json, source_record
from engine.data.images import check_image, skip_reason
from engine.data.layout import (
    DatasetManifest,
    check_destination,
    commit_dataset,
    image_file,
    normal_address,
    read_committed,
)
from engine.data.masks import MaskFinder, check_mask, kept_masks, mask_file
from engine.data.reread import RereadFiles
from engine.data.row_filters import apply_filters
from engine.data.sources import Source, as_image_column, image_bytes, image_name, load_source
from engine.task.definition import DatasetArgs


def prepare_dataset(
    args: DatasetArgs,
    dest: str,
    *,
    work_dir: Path | None = None,
    progress: bool = False,
    buckets: tuple[Bucket, ...] | None = None,
    keep_uncaptioned: bool = False,
) -> DatasetManifest:
    """Prepare the dataset of ``args`` at ``dest`` (local path or fsspec URL).

    Idempotent: when ``dest`` already holds a valid prepared dataset of the same source,
    it is returned as is. Otherwise the source is loaded (downloads and ``datasets``
    caches go to a scratch folder under ``work_dir``, removed at the end), columns and
    captions are checked before any image work, every image is checked, and the layout
    is committed with the manifest last.

    ``buckets``: when given, each record gets ``"bucket": [w, h]``, the bucket nearest its
    size (:func:`engine.data.buckets.nearest_bucket`), and the list joins the source
    record (so the address and the reuse check follow it). None changes nothing.

    ``keep_uncaptioned`` (a task with ``captioning``): images without a caption are kept
    with an empty one for the caption step to fill (a caption folder's image without its
    caption file, an image folder without metadata), and joins the source record.
    """
    if bool(args.url) == bool(args.name):
        raise DatasetError("dataset: set exactly one of 'url' and 'name'")
    address = normal_address(dest)
    source_info = source_record(args, buckets, keep_uncaptioned)
    existing = read_committed(address)
    if existing is not None and existing[0].get("source") == source_info:
        return DatasetManifest.of(address, existing[0])
    with _scratch(work_dir) as work, _progress_bars(progress):
        source = load_source(args, work, progress=progress, keep_uncaptioned=keep_uncaptioned)
        if keep_uncaptioned:
            source.dataset = with_caption_column(
                source.dataset, args.caption_column, image_column=args.image_column,
                mask_column=args.mask_column,
            )
        check_columns(source.dataset, args)
        filtered_out = apply_filters(source, args.filters, args.image_column)
        captions = normalized_captions(
            list(source.dataset[args.caption_column]), args.caption_column, keep_uncaptioned
        )
        source.dataset = as_image_column(source.dataset, args.image_column)
        masks = MaskFinder.of(args, source)  # None: no masks (nothing new is written)
        check_destination(address)
        kept = _check_examples(
            source, args.image_column, captions, buckets=buckets, progress=progress,
            masks=masks,
        )
        _check_usable(kept, args, keep_uncaptioned)
        meta = {
            "source": source_info,
            "skipped": kept.skipped,
            "empty_captions": kept.empty_captions,
            "columns": {
                "image": args.image_column,
                "caption": args.caption_column,
                "available": list(source.dataset.column_names),
            },
            **source.report,
        }
        if args.filters:
            meta["filtered_out"] = filtered_out
        images: Mapping[str, bytes] = _kept_images(source, args.image_column, kept)
        if masks is not None:
            rows = source.dataset.select_columns([args.image_column])
            images = ChainMap(images, kept_masks(masks, rows, args.image_column, kept.masks))
        manifest = commit_dataset(address, images, kept.records, meta)
    return DatasetManifest.of(address, manifest)


@dataclass
class _Kept:
    """The outcome of checking every example: records of the kept ones, and why the
    others were skipped. ``files`` maps each stored image name to (row, sha256)."""

    records: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    empty_captions: int = 0
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    masks: dict[str, tuple[int, str]] = field(default_factory=dict)


def _check_examples(
    source: Source,
    column: str,
    captions: list[list[str]],
    *,
    buckets: tuple[Bucket, ...] | None,
    progress: bool,
    masks: MaskFinder | None = None,
) -> _Kept:
    """Check every image (never stops on a bad one); nothing is written yet."""
    from tqdm import tqdm

    kept = _Kept()
    rows = source.dataset.select_columns([column])
    for index, row in enumerate(tqdm(rows, desc="checking images", disable=not progress)):
        if index in source.rejected:  # known bad before any image work (no caption file)
            kept.skipped.append(_skipped(index, row[column], source, source.rejected[index]))
            continue
        try:
            data = image_bytes(row[column], source)
            ext, width, height = check_image(data)
        except Exception as err:  # untrusted files: PIL raises many types; skip, never crash
            kept.skipped.append(_skipped(index, row[column], source, err))
            continue
        file = image_file(len(kept.records), ext)
        sha256 = hashlib.sha256(data).hexdigest()
        record = {
            "file": file,
            "captions": captions[index],
            "width": width,
            "height": height,
            "sha256": sha256,
            **source.extras.get(index, {}),
        }
        if buckets is not None:
            record["bucket"] = list(nearest_bucket((width, height), buckets))
        if masks is not None:  # a bad mask is the user's to fix: an error, never a skip
            where, mask = masks.find(index, row[column])
            record["mask"] = mask_file(len(kept.records), check_mask(mask, (width, height),
                                                                     where))
            record["mask_sha256"] = hashlib.sha256(mask).hexdigest()
            kept.masks[record["mask"]] = (index, record["mask_sha256"])
        kept.records.append(canonical_json(record))
        kept.files[file] = (index, sha256)
        kept.empty_captions += not has_text(captions[index])
    return kept


def _skipped(
    index: int, value: Any, source: Source, err: Exception | str
) -> dict[str, Any]:
    """The manifest's entry for a skipped row: its row in the source, its file name if
    any, why."""
    entry: dict[str, Any] = {"index": source.source_row(index)}
    name = image_name(value, source)
    if name is not None:
        entry["file"] = name
    entry["reason"] = err if isinstance(err, str) else skip_reason(err)
    return entry


def _kept_images(source: Source, column: str, kept: _Kept) -> RereadFiles:
    """The kept images as the commit wants them, read again from the (local, scratch or
    source) files that were checked, one at a time."""
    rows = source.dataset.select_columns([column])

    def read(index: int) -> tuple[str, bytes]:
        return (f"source image of row {index}",
                image_bytes(rows[index][column], source))

    return RereadFiles(kept.files, read)


def _check_usable(kept: _Kept, args: DatasetArgs, keep_uncaptioned: bool = False) -> None:
    if not kept.records:
        reasons = sorted({s["reason"] for s in kept.skipped})[:5]
        raise DatasetError(
            f"no usable image in the dataset ({len(kept.skipped)} skipped; "
            f"e.g. {'; '.join(reasons)})"
        )
    if not keep_uncaptioned and kept.empty_captions == len(kept.records):
        raise DatasetError(
            f"caption column {args.caption_column!r} has no non-empty caption "
            "among the usable images"
        )


@contextlib.contextmanager
def _scratch(work_dir: Path | None) -> Iterator[Path]:
    """A fresh scratch folder (inside ``work_dir`` if given), removed afterwards."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    path = Path(
        tempfile.mkdtemp(
            prefix="loraflow-prepare-", dir=str(work_dir) if work_dir is not None else None
        )
    )
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn ``datasets``' own progress bars off for the duration, unless wanted."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    if not enabled and was:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not datasets.is_progress_bar_enabled():
            datasets.enable_progress_bars()
