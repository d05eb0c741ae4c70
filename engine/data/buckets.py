"""Aspect-ratio buckets: which sizes a batch may have, and which one each image goes to.

A bucket is a training size (width, height) in pixels. An image goes to the bucket
nearest its aspect ratio, is resized to cover it (aspect kept, the binding side exact)
and cropped to it. Everything here is integer arithmetic or exact fraction comparison,
so the same image gets the same bucket on every machine.

Without bucketing every subset has one bucket, the square ``resolution`` x
``resolution``, and the cover size is exactly the square resize of
:func:`engine.data.transforms.resized_size`: turning buckets off is today's training.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from engine.task.definition import BucketArgs


class Bucket(NamedTuple):
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


class BucketError(ValueError):
    """A bucket list that cannot be trained (raised with the setting to fix)."""


def bucket_list(resolution: int, args: BucketArgs | None) -> tuple[Bucket, ...]:
    """The buckets of a subset trained at ``resolution`` with bucket settings ``args``.

    Sorted by aspect ratio (tallest first), then area; never empty. ``None`` (bucketing
    off): the one square bucket.
    """
    if args is None:
        return (Bucket(resolution, resolution),)
    step = args.step
    if args.sizes is not None:
        found = [Bucket(int(w), int(h)) for w, h in args.sizes]
        for b in found:
            if b.width % step or b.height % step:
                raise BucketError(f"bucket {b} has a side that is not a multiple of step {step}")
    elif args.ratios is not None:
        found = [_bucket_for_ratio(resolution, step, _ratio(r)) for r in args.ratios]
    else:
        found = _derived(resolution, step, args.max_aspect_ratio)
    if not found:
        raise BucketError(
            f"no bucket fits resolution {resolution} with step {step}: make the resolution "
            "at least the step"
        )
    return tuple(sorted(set(found), key=lambda b: (b.width / b.height, b.width * b.height)))


def _derived(resolution: int, step: int, max_aspect_ratio: float) -> list[Bucket]:
    """Every (w, h), sides multiples of ``step``, area <= resolution^2, h the largest that
    fits for w, long/short <= ``max_aspect_ratio``; and each one turned on its side, so
    portrait and landscape photos get the same shapes."""
    area = resolution * resolution
    out = []
    for width in range(step, int(resolution * max_aspect_ratio) + step, step):
        height = (area // width) // step * step
        if height < step:
            break
        if max(width, height) <= max_aspect_ratio * min(width, height):
            out += [Bucket(width, height), Bucket(height, width)]  # portrait as landscape
    return out


def _ratio(value: float | str) -> float:
    if isinstance(value, str):
        w, h = value.split(":")
        return int(w) / int(h)
    return float(value)


def _bucket_for_ratio(resolution: int, step: int, ratio: float) -> Bucket:
    """The bucket of aspect ``ratio`` (w / h) with area about resolution^2 (not above)."""
    width = max(step, int(math.sqrt(resolution * resolution * ratio)) // step * step)
    height = max(step, int(math.sqrt(resolution * resolution / ratio)) // step * step)
    return Bucket(width, height)


def nearest_bucket(size_wh: tuple[int, int], buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (ties: the first in the list).

    Distance is the ratio of the two aspect ratios, long over short (1 = same shape),
    compared as exact fractions.
    """
    width, height = size_wh
    best, best_num, best_den = buckets[0], 0, 0
    for b in buckets:
        a, c = width * b.height, height * b.width  # image w/h vs bucket w/h, cross-multiplied
        num, den = max(a, c), min(a, c)
        if best_den == 0 or num * best_den < best_num * den:
            best, best_num, best_den = b, num, den
    return best


def cover_size(size_wh: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """(height, width) of the image resized to cover ``bucket``, aspect kept.

    The side that binds is the bucket's exactly; the other is rounded half up with
    integers, so it is never below the bucket's. For a square bucket this is
    :func:`engine.data.transforms.resized_size`.
    """
    width, height = size_wh
    if width <= 0 or height <= 0:
        raise ValueError(f"bad image size {size_wh}")
    if bucket.width * height >= bucket.height * width:  # width binds
        return (2 * height * bucket.width + width) // (2 * width), bucket.width
    return bucket.height, (2 * width * bucket.height + height) // (2 * height)
