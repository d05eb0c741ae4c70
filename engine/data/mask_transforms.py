"""A loss mask taken through its image's crop, then down to the latent's size.

The mask (a float image of :func:`engine.data.masks.decode_mask`) goes through exactly
the geometry of its image in :func:`engine.data.transforms.apply_crop`: the same resize
(size and BILINEAR filter, which antialiases when shrinking), the same crop rectangle of
the same :class:`~engine.data.transforms.CropPlan`, the same flip. It is resized as a
float (PIL mode ``F``), so grey levels are not rounded to 8 bits on the way.

Then it is brought to latent size by an area (box) filter: each latent pixel's weight is
the mean of the ``factor`` x ``factor`` image pixels it encodes (summed in float64, then
rounded once to float32, so the result does not depend on summation order). A latent
pixel half covered by the subject weighs 0.5; a white mask is exactly 1.0 everywhere (a
constant resizes to itself), which is what keeps a white mask's training bit-identical
to no mask. Values are clipped to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from engine.data.transforms import RESIZE_FILTER, CropPlan


def crop_mask(mask: Image.Image, plan: CropPlan, *, flip: bool, factor: int) -> torch.Tensor:
    """The mask's latent-size weights, float32 [1, bucket height / factor, bucket width /
    factor] in [0, 1], for the crop ``plan`` (and ``flip``) of its image."""
    height, width = plan.original_size
    if mask.size != (width, height):
        raise ValueError(
            f"mask is {mask.size[0]}x{mask.size[1]} but the crop plan is for {width}x{height}"
        )
    crop_h, crop_w = plan.crop_size
    if crop_h % factor or crop_w % factor:
        raise ValueError(f"crop {crop_w}x{crop_h} is not a multiple of the latent factor {factor}")
    if mask.mode != "F":
        mask = mask.convert("F")
    new_h, new_w = plan.resized_size
    if (new_w, new_h) != mask.size:
        mask = mask.resize((new_w, new_h), resample=RESIZE_FILTER)
    cropped = mask.crop((plan.left, plan.top, plan.left + crop_w, plan.top + crop_h))
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(cropped, dtype=np.float64)  # [H, W]
    boxes = pixels.reshape(crop_h // factor, factor, crop_w // factor, factor).sum(axis=(1, 3))
    weights = np.clip(boxes / float(factor * factor), 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(weights)[None]
