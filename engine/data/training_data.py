"""What a task trains on: its subsets' examples as one indexed collection.

A task has one or more subsets (``task.subsets``), each a prepared dataset with its own
repeats, loss weight, caption rules, resolution and buckets. :class:`TrainingData` puts
their examples one after another (subset 0's first) and answers, for example ``i``:
its images and captions (from its prepared dataset), and the training settings of the
subset it belongs to, including its bucket (computed, never stored, from its size).

For a single subset it is the prepared dataset itself with the subset's settings: same
indices, same ``content_hash``, so a one-source task trains exactly as before subsets.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from PIL import Image

from engine.data.buckets import Bucket, bucket_list, nearest_bucket
from engine.data.masks import wants_masks
from engine.task.definition import CaptionArgs, DatasetArgs, TrainArgs


class ExampleSource(Protocol):
    """What a prepared dataset (or a streamed shard index) offers the trainer."""

    address: str
    manifest: Any

    @property
    def content_hash(self) -> str: ...
    def __len__(self) -> int: ...
    def captions(self, i: int) -> list[str]: ...
    def size(self, i: int) -> tuple[int, int]: ...
    def image(self, i: int) -> Image.Image: ...
    def record(self, i: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SubsetSettings:
    """How one subset trains: the subset's own arguments made concrete."""

    repeats: int
    loss_weight: float
    captions: CaptionArgs
    resolution: int
    buckets: tuple[Bucket, ...]
    #: loss weight of a masked-out pixel (``mask_min_weight``); None: no loss masks
    mask_floor: float | None = None

    @classmethod
    def of(cls, args: DatasetArgs, train_args: TrainArgs) -> SubsetSettings:
        resolution = args.resolution or train_args.resolution
        return cls(
            repeats=args.repeats,
            loss_weight=args.loss_weight,
            captions=args.captions,
            resolution=resolution,
            buckets=bucket_list(resolution, args.buckets or train_args.buckets),
            mask_floor=args.mask_min_weight if wants_masks(args) else None,
        )


class TrainingData:
    """The examples of every subset, indexed 0..len-1 in subset order."""

    def __init__(self, parts: Sequence[ExampleSource], settings: Sequence[SubsetSettings]):
        if len(parts) != len(settings) or not parts:
            raise ValueError("one settings object per subset, and at least one subset")
        self.parts = list(parts)
        self.settings = list(settings)
        self._starts = [0]
        for part in self.parts:
            self._starts.append(self._starts[-1] + len(part))

    # -- identity -----------------------------------------------------------------------

    @property
    def content_hash(self) -> str:
        """The prepared dataset's hash for one subset; a hash of all of them for several."""
        if len(self.parts) == 1:
            return self.parts[0].content_hash
        joined = ",".join(p.content_hash for p in self.parts)
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def subset_hashes(self) -> list[str]:
        return [p.content_hash for p in self.parts]

    @property
    def manifest(self) -> dict[str, Any]:
        """The first subset's manifest, with every subset's skipped images (each entry
        naming its subset when there are several)."""
        first = dict(self.parts[0].manifest)
        if len(self.parts) > 1:
            first["skipped"] = [
                {**s, "subset": k}
                for k, p in enumerate(self.parts)
                for s in p.manifest.get("skipped", [])
            ]
        return first

    # -- examples -----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(subset, index inside that subset's prepared dataset) of example ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def subset_of(self, i: int) -> int:
        return self.locate(i)[0]

    def subset_settings(self, i: int) -> SubsetSettings:
        return self.settings[self.subset_of(i)]

    def captions(self, i: int) -> list[str]:
        k, j = self.locate(i)
        return self.parts[k].captions(j)

    def size(self, i: int) -> tuple[int, int]:
        k, j = self.locate(i)
        return self.parts[k].size(j)

    def image(self, i: int) -> Image.Image:
        k, j = self.locate(i)
        return self.parts[k].image(j)

    def record(self, i: int) -> dict[str, Any]:
        k, j = self.locate(i)
        return self.parts[k].record(j)

    def mask(self, i: int) -> Image.Image | None:
        """Example ``i``'s loss mask (:mod:`engine.data.masks`); None when it has none."""
        k, j = self.locate(i)
        if self.settings[k].mask_floor is None or "mask" not in self.parts[k].record(j):
            return None
        return self.parts[k].mask(j)  # type: ignore[attr-defined]

    @property
    def masked(self) -> bool:
        """Whether any subset trains with loss masks."""
        return any(s.mask_floor is not None for s in self.settings)

    def repeats(self, i: int) -> int:
        """Uses of example ``i`` per epoch: its subset's repeats times its own (a kohya
        ``NN_name`` folder's NN, kept in its record)."""
        k, j = self.locate(i)
        return self.settings[k].repeats * int(self.parts[k].record(j).get("repeats", 1))

    def bucket(self, i: int) -> Bucket:
        """The training size of example ``i``: its subset's bucket nearest its shape."""
        return self.buckets[i]

    @cached_property
    def buckets(self) -> list[Bucket]:
        return [nearest_bucket(self.size(i), self.subset_settings(i).buckets)
                for i in range(len(self))]

    @property
    def bucketed(self) -> bool:
        """Whether any subset has more than one bucket (else: the old square training)."""
        return any(len(s.buckets) > 1 for s in self.settings)
