"""Deterministic image transforms for training (PIL + numpy + torch, no torchvision).

The random decisions (crop position, horizontal flip) are NOT drawn here: the trainer
draws them from its own seeded generators and passes them in. So the same inputs always
give the same pixels, a resumed run repeats the exact same crops, and a cached latent
can be matched to the decision it was computed for.

Pipeline, as in the diffusers text-to-image LoRA script: resize so the image covers the
target (aspect kept; for the square ``resolution`` x ``resolution`` the shorter side
becomes the resolution), crop the target (center or at a drawn position), optionally
mirror, scale to [-1, 1]. The target is a square or an aspect-ratio bucket
(:class:`engine.data.buckets.Bucket`); a square bucket gives exactly the square's pixels.
The resize uses PIL's BILINEAR filter, which antialiases when downscaling (what
torchvision's ``Resize`` does on PIL images, so results match the reference script).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.data.buckets import Bucket, cover_size

RESIZE_FILTER = Image.Resampling.BILINEAR
_TRANSPARENT_BACKGROUND = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class CropPlan:
    """Where one image is cropped: everything needed to redo the crop exactly.

    Sizes are (height, width), the order SDXL's ``add_time_ids`` uses for
    ``original_size`` and ``crops_coords_top_left`` (= ``(top, left)``). The crop is
    ``bucket`` (width x height); give either ``bucket`` or, for a square, ``resolution``:
    the other is filled in (``resolution`` stays None for a bucket that is not square).
    """

    original_size: tuple[int, int]  # (height, width) before resize
    resized_size: tuple[int, int]  # (height, width) after resize
    top: int
    left: int
    resolution: int | None = None
    bucket: Bucket | None = None

    def __post_init__(self) -> None:
        if self.bucket is None:
            if self.resolution is None:
                raise ValueError("a crop plan needs a bucket or a resolution")
            object.__setattr__(self, "bucket", Bucket(self.resolution, self.resolution))
        elif self.resolution is None and self.bucket.width == self.bucket.height:
            object.__setattr__(self, "resolution", self.bucket.width)

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the crop: the bucket's."""
        assert self.bucket is not None  # set in __post_init__
        return self.bucket.height, self.bucket.width


def resized_size(size_wh: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``resolution``.

    The longer side is rounded half up with integer arithmetic, so the answer never
    depends on float rounding.
    """
    width, height = size_wh
    if width <= 0 or height <= 0 or resolution <= 0:
        raise ValueError(f"bad size {size_wh} or resolution {resolution}")
    if width <= height:
        return (2 * height * resolution + width) // (2 * width), resolution
    return resolution, (2 * width * resolution + height) // (2 * height)


def plan_crop(
    size_wh: tuple[int, int],
    target: int | Bucket,
    *,
    center: bool,
    generator: torch.Generator | None,
) -> CropPlan:
    """Decide the crop of an image of ``size_wh`` = (width, height) to ``target`` (a
    bucket, or an int for the square of that side).

    Center crop: the offset is ``(extra) // 2`` on each axis and nothing is drawn.
    Random crop: exactly two ``torch.randint`` draws, top then left, each over
    ``[0, extra]`` (also when ``extra`` is 0), so the trainer's generator advances by the
    same amount whatever the image size or bucket.
    """
    bucket = target if isinstance(target, Bucket) else Bucket(target, target)
    if bucket.width <= 0 or bucket.height <= 0:
        raise ValueError(f"bad crop target {bucket}")
    new_h, new_w = cover_size(size_wh, bucket)
    extra_h, extra_w = new_h - bucket.height, new_w - bucket.width
    if center:
        top, left = extra_h // 2, extra_w // 2
    else:
        top = int(torch.randint(0, extra_h + 1, (1,), generator=generator).item())
        left = int(torch.randint(0, extra_w + 1, (1,), generator=generator).item())
    return CropPlan(
        original_size=(size_wh[1], size_wh[0]),
        resized_size=(new_h, new_w),
        top=top,
        left=left,
        bucket=bucket,
    )


def resized_rgb(image: Image.Image, plan: CropPlan) -> Image.Image:
    """``image`` (checked to have the size the plan was made for) as RGB, resized to the
    plan's size: what every crop of it is cut from."""
    height, width = plan.original_size
    if image.size != (width, height):
        raise ValueError(
            f"image is {image.size[0]}x{image.size[1]} but the crop plan is for {width}x{height}"
        )
    rgb = to_rgb(image)
    new_h, new_w = plan.resized_size
    if (new_w, new_h) != rgb.size:
        rgb = rgb.resize((new_w, new_h), resample=RESIZE_FILTER)
    return rgb


def apply_crop(image: Image.Image, plan: CropPlan, *, flip: bool) -> torch.Tensor:
    """The cropped image as a float32 tensor [3, bucket height, bucket width] in [-1, 1].

    ``image`` must have the size the plan was made for. Any PIL mode is accepted
    (converted with :func:`to_rgb`).
    """
    rgb = resized_rgb(image, plan)
    crop_h, crop_w = plan.crop_size
    cropped = rgb.crop((plan.left, plan.top, plan.left + crop_w, plan.top + crop_h))
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(cropped, dtype=np.uint8)  # [H, W, 3]
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of ``image``, whatever its mode.

    * Animated images: the current frame (the first, for a freshly opened file).
    * 16-bit grey (``I;16*``, and ``I`` holding 16-bit data): scaled to 8 bits
      (``(v + 128) // 257``); a plain ``convert`` would clip everything above 255 to white.
    * Transparency (RGBA, LA, PA, palette or grey with a transparent colour):
      composited on WHITE, so transparent areas do not turn into whatever colour the
      encoder left under them (often black).
    * Everything else (L, 1, P, CMYK, YCbCr, ...): PIL's ``convert("RGB")``. Embedded
      ICC profiles are ignored, as in the diffusers reference scripts.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight(image)
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _TRANSPARENT_BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grey to 8-bit "L" ("LA" if one value is transparent).

    The transparent value is matched on the 16-bit data, before scaling merges it with
    its neighbours.
    """
    values = np.asarray(image).astype(np.int64)
    eight = Image.fromarray(((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8))
    transparency = image.info.get("transparency")
    if not isinstance(transparency, int):
        return eight
    alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
    return Image.merge("LA", (eight, Image.fromarray(alpha)))


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
