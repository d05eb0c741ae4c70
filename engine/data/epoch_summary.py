"""What one epoch of a task's data holds, for a person: buckets, subsets, images, batches.

Why: bucketing and repeats decide how often each image is trained, and peers that drop
the remainder of an underfull bucket leave users wondering where their images went.
The summary says, before any step is trained, how many images each bucket and each
subset holds, how many uses (images x repeats) an epoch makes of them, in how many
batches, and which files were skipped and why. It is computed from the
:class:`~engine.data.training_data.TrainingData` alone (nothing stored), small and
JSON-able, so it travels in Prefect payloads and the run summary.

Batches are counted per bucket (a batch holds one bucket) at ``batch_size``; a bucket's
last batch may be smaller: no use is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.data.training_data import TrainingData

#: How many skipped files the summary names; the full list stays in each manifest.
SKIPPED_SHOWN = 20


@dataclass(frozen=True)
class BucketCount:
    """One bucket in an epoch: its size, its images, their uses, the batches they fill."""

    bucket: str  # "WxH" in pixels
    images: int
    uses: int  # images x repeats: samples of this bucket per epoch
    batches: int


@dataclass(frozen=True)
class SubsetCount:
    """One subset in an epoch, named as a published file may name it (never a path)."""

    name: str
    images: int
    repeats: int  # the subset's own; a kohya NN_name folder multiplies it per image
    uses: int
    loss_weight: float = 1.0  # scales each of its samples' loss terms


@dataclass(frozen=True)
class EpochSummary:
    """The data of one epoch: what the run summary, the artifact and the CLI show."""

    images: int
    images_per_epoch: int  # uses: every image times its repeats
    batches_per_epoch: int
    batch_size: int
    buckets: list[BucketCount]
    subsets: list[SubsetCount]
    skipped: int = 0
    skipped_examples: list[dict[str, Any]] = field(default_factory=list)


def epoch_summary(data: TrainingData, batch_size: int, names: Sequence[str],
                  skipped: Sequence[dict[str, Any]] = ()) -> EpochSummary:
    """The summary of ``data`` trained at ``batch_size``; ``names`` one per subset.

    ``skipped``: the prepared datasets' skipped entries (file, reason, subset); the
    first :data:`SKIPPED_SHOWN` are named.
    """
    if len(names) != len(data.settings):
        raise ValueError("one name per subset")
    per_bucket: dict[tuple[int, int], list[int]] = {}
    per_subset = [[0, 0] for _ in names]  # images, uses
    for i in range(len(data)):
        uses = data.repeats(i)
        bucket = data.bucket(i)
        counts = per_bucket.setdefault((bucket.width, bucket.height), [0, 0])
        counts[0] += 1
        counts[1] += uses
        k = data.subset_of(i)
        per_subset[k][0] += 1
        per_subset[k][1] += uses
    buckets = [
        BucketCount(f"{w}x{h}", images, uses, math.ceil(uses / batch_size))
        for (w, h), (images, uses) in sorted(per_bucket.items(), key=lambda kv: kv[0][0] / kv[0][1])
    ]
    subsets = [
        SubsetCount(name, images, settings.repeats, uses, settings.loss_weight)
        for name, settings, (images, uses) in zip(names, data.settings, per_subset, strict=True)
    ]
    return EpochSummary(
        images=len(data),
        images_per_epoch=sum(b.uses for b in buckets),
        batches_per_epoch=sum(b.batches for b in buckets),
        batch_size=batch_size,
        buckets=buckets,
        subsets=subsets,
        skipped=len(skipped),
        skipped_examples=[dict(s) for s in list(skipped)[:SKIPPED_SHOWN]],
    )


def summary_lines(summary: EpochSummary) -> list[str]:
    """A few lines for a terminal or a log: totals, then one line per bucket and subset."""
    lines = [
        f"data: {summary.images} images, {summary.images_per_epoch} uses per epoch in "
        f"{summary.batches_per_epoch} batches of up to {summary.batch_size}"
        + (f"; {summary.skipped} file(s) skipped" if summary.skipped else ""),
    ]
    lines += [f"  bucket {b.bucket:>9}: {b.images} images, {b.uses} uses, {b.batches} batches"
              for b in summary.buckets]
    if len(summary.subsets) > 1:
        lines += [f"  subset {s.name}: {s.images} images x{s.repeats} = {s.uses} uses"
                  for s in summary.subsets]
    lines += [f"  skipped {s.get('file', s.get('index'))}: {s.get('reason')}"
              for s in summary.skipped_examples[:5]]
    return lines
