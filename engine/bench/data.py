"""Synthetic training data: random images in memory, shaped like a prepared dataset."""

from __future__ import annotations

import hashlib
from typing import Any


class SyntheticDataset:
    """Random RGB images with one caption each, in memory.

    It has the interface :class:`engine.train.samples.SampleSource` and the cache read from a
    prepared dataset (``__len__``, ``captions``, ``size``, ``image``, ``content_hash``),
    so the bench needs no files. Images are exactly ``resolution`` square, so resizing
    costs nothing and the crop is the whole image.
    """

    def __init__(self, count: int, resolution: int, seed: int = 0) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        self._images = [
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
            for _ in range(count)
        ]
        self._resolution = resolution
        key = f"synthetic:{count}:{resolution}:{seed}"
        self._hash = hashlib.sha256(key.encode()).hexdigest()[:32]

    @property
    def content_hash(self) -> str:
        return self._hash

    def __len__(self) -> int:
        return len(self._images)

    def captions(self, i: int) -> list[str]:
        return [f"a photo of synthetic sample {i}"]

    def size(self, i: int) -> tuple[int, int]:
        return (self._resolution, self._resolution)

    def image(self, i: int) -> Any:
        return self._images[i]
