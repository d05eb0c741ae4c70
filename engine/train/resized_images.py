"""Each example's image decoded and resized once per process, cropped for every use.

Why: with the cache off, every use of an example decoded its file, converted it to RGB
and resized it before cropping, and only the crop and the flip change from use to use
(with center crop, nothing does). Decoding and resizing were about half the data path on
tiny-sd1 at 64 px. :class:`ResizedImages` keeps the resized image as uint8 RGB and cuts
each crop out of it with array slicing; the flip is a reversed slice. Cropping and
mirroring copy pixels exactly in PIL and in numpy alike, so the pixels are the very bits
:func:`engine.data.transforms.apply_crop` makes (a test checks it).

It is not a latent cache: the VAE and the text encoder still run on every sample. It
lives in the process (each data-loader worker holds its own) and is bounded: at most
:data:`MEMO_BYTES` of images are kept, the first ones met; the others are decoded on
every use as before. The file is read once per process, so a dataset is verified where it
always was (when it is opened), not by re-reading it at every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.data.transforms import CropPlan, apply_crop, resized_rgb

#: Bytes of resized images one process keeps (64 px: ~12 KiB an image; 1024 px: ~3 MiB).
MEMO_BYTES = 256 * 1024**2


class ResizedImages:
    """example index -> its image resized to a crop plan's ``resized_size`` (uint8 HWC)."""

    def __init__(self, budget_bytes: int = MEMO_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._images: dict[tuple[int, tuple[int, int]], np.ndarray] = {}

    def pixels(self, data: Any, index: int, plan: CropPlan, flip: bool) -> torch.Tensor:
        """What ``apply_crop(data.image(index), plan, flip=flip)`` returns, bit for bit."""
        if not _inside(plan):  # PIL pads a crop that leaves the image; slicing would not
            return apply_crop(data.image(index), plan, flip=flip)
        key = (index, plan.resized_size)
        resized = self._images.get(key)
        if resized is None:
            resized = _resized(data.image(index), plan)
            if self.used_bytes + resized.nbytes <= self.budget_bytes:
                self._images[key] = resized
                self.used_bytes += resized.nbytes
        height, width = plan.crop_size
        crop = resized[plan.top:plan.top + height, plan.left:plan.left + width]
        if flip:
            crop = crop[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).to(torch.float32)
        return tensor / 127.5 - 1.0  # as apply_crop scales


def _inside(plan: CropPlan) -> bool:
    height, width = plan.crop_size
    new_h, new_w = plan.resized_size
    return 0 <= plan.top <= new_h - height and 0 <= plan.left <= new_w - width


def _resized(image: Any, plan: CropPlan) -> np.ndarray:
    """``image`` as apply_crop resizes it (:func:`resized_rgb`), as a writable array: crops
    of it become tensors."""
    return np.array(resized_rgb(image, plan), dtype=np.uint8)
