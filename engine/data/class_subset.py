"""The DreamBooth class subset: the class images as one more prepared dataset.

Prior preservation trains the class images (each captioned with the class prompt) beside
the instance subsets, their samples' loss scaled by ``prior_loss_weight`` (the kohya way:
a subset of its own, mixed into each epoch by ``data_order``), so everything after
preparation (buckets, cache, plan, exact resume, epoch summary) treats it as any subset.

The prepared folder is content-addressed: its address is a hash of its records (each
holding its image's sha256, the caption and the bucket), so the same class images are
committed once and found again, and a changed ``class_data_dir`` gets a new address.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from engine.data.buckets import Bucket, bucket_list, nearest_bucket
from engine.data.errors import DatasetError
from engine.data.identity import canonical_json
from engine.data.images import check_image, skip_reason
from engine.data.layout import (
    DatasetManifest,
    commit_dataset,
    image_file,
    normal_address,
    read_committed,
)
from engine.data.training_data import SubsetSettings
from engine.store import storage
from engine.task.definition import CaptionArgs, TaskDefinition

#: How summaries and published files name the class subset.
CLASS_SUBSET_NAME = "dreambooth class images"
#: What a class_data_dir file may be called to be taken as an image.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def class_subset_names(task: TaskDefinition) -> list[str]:
    """The class subset's name, to follow the task's subset names; none without it."""
    return [CLASS_SUBSET_NAME] if task.dreambooth is not None else []


def class_subset_settings(task: TaskDefinition) -> SubsetSettings:
    """How the class subset trains: once per epoch, at the training resolution and
    buckets, plain captions (no instance prefix), weighted by ``prior_loss_weight``."""
    ta, db = task.train_args, task.dreambooth
    assert db is not None
    return SubsetSettings(repeats=1, loss_weight=db.prior_loss_weight, captions=CaptionArgs(),
                          resolution=ta.resolution,
                          buckets=bucket_list(ta.resolution, ta.buckets))


def record_buckets(task: TaskDefinition) -> tuple[Bucket, ...] | None:
    """The buckets records are assigned to (as prepare_subsets does); None when off."""
    if task.train_args.buckets is None:
        return None
    return class_subset_settings(task).buckets


@dataclass
class FolderImages:
    """The usable images of a class_data_dir, in name order, and the files skipped."""

    images: list[bytes] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def folder_images(url: str, limit: int) -> FolderImages:
    """Up to ``limit`` checked images of the folder at ``url`` (name order); bad files
    are skipped with a reason, as preparing a dataset does. A missing folder is an error."""
    names = [n for n in storage.list_files(url) if n.lower().endswith(IMAGE_SUFFIXES)]
    if not names and not storage.exists(url):
        raise DatasetError(f"dreambooth.class_data_dir {storage.redact(url)}: no such folder")
    found = FolderImages()
    for name in names:
        if len(found.images) == limit:
            break
        data = storage.read_bytes(storage.join(url, name))
        try:
            check_image(data)
        except Exception as err:  # untrusted files: PIL raises many types; skip, never crash
            found.skipped.append({"file": name, "reason": skip_reason(err)})
            continue
        found.images.append(data)
    return found


def commit_class_subset(root: str, images: list[bytes], prompt: str,
                        buckets: tuple[Bucket, ...] | None,
                        skipped: list[dict] | None = None) -> DatasetManifest:
    """The class images prepared as a dataset under ``root`` (found if committed).

    Each record is captioned ``prompt``; with ``buckets``, it holds its nearest bucket.
    """
    if not images:
        raise DatasetError("dreambooth: no class images to train on")
    records, files = [], {}
    for i, data in enumerate(images):
        ext, width, height = check_image(data)
        name = image_file(i, ext)
        record = {"file": name, "captions": [prompt], "width": width, "height": height,
                  "sha256": hashlib.sha256(data).hexdigest()}
        if buckets is not None:
            record["bucket"] = list(nearest_bucket((width, height), buckets))
        records.append(canonical_json(record))
        files[name] = data
    digest = hashlib.sha256("\n".join(records).encode()).hexdigest()
    address = normal_address(f"{root.rstrip('/')}/class-subset-{digest[:16]}")
    existing = read_committed(address)
    if existing is not None:
        return DatasetManifest.of(address, existing[0])
    meta = {"source": {"dreambooth_class_images": digest}, "skipped": list(skipped or []),
            "empty_captions": 0}
    return DatasetManifest.of(address, commit_dataset(address, files, records, meta))
