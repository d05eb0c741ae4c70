"""Images decoded and resized once per process give apply_crop's pixels, bit for bit
(engine/train/resized_images.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.buckets import Bucket
from engine.data.transforms import apply_crop, plan_crop
from engine.train.resized_images import ResizedImages


class Images:
    """A dataset's ``image(i)``: a fresh copy each call, and a count of the calls."""

    def __init__(self, images: list[Image.Image]) -> None:
        self.images, self.reads = images, 0

    def image(self, index: int) -> Image.Image:
        self.reads += 1
        return self.images[index].copy()


def photos() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
           for w, h in ((97, 64), (64, 131), (80, 80), (64, 64))]
    rgba = Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (75, 66), dtype=np.uint8), "L")
    return [*rgb, rgba, grey]


@pytest.mark.parametrize("target", [64, Bucket(64, 48)], ids=["square", "bucket"])
def test_every_crop_and_flip_has_apply_crops_bits_from_a_memo_hit_or_miss(target) -> None:
    data = Images(photos())
    memo = ResizedImages()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the first round fills the memo, the others read it
        for i, image in enumerate(data.images):
            for center in (True, False):
                plan = plan_crop(image.size, target, center=center, generator=g)
                for flip in (False, True):
                    got = memo.pixels(data, i, plan, flip)
                    want = apply_crop(image, plan, flip=flip)
                    assert got.dtype == want.dtype and got.shape == want.shape
                    assert torch.equal(got, want)
    assert memo.used_bytes > 0


def test_each_image_is_read_once_while_it_fits_and_on_every_use_beyond_the_budget() -> None:
    data = Images(photos()[:2])
    plans = [plan_crop(im.size, 64, center=True, generator=None) for im in data.images]
    memo = ResizedImages()
    for _ in range(4):
        for i, plan in enumerate(plans):
            memo.pixels(data, i, plan, False)
    assert data.reads == 2
    nothing_kept = ResizedImages(budget_bytes=0)
    data.reads = 0
    for _ in range(4):
        got = nothing_kept.pixels(data, 0, plans[0], True)
    assert data.reads == 4 and nothing_kept.used_bytes == 0
    assert torch.equal(got, apply_crop(data.images[0], plans[0], flip=True))


def test_a_crop_plan_for_another_size_is_refused_as_apply_crop_refuses_it() -> None:
    data = Images(photos())
    plan = plan_crop((200, 100), 64, center=True, generator=None)
    with pytest.raises(ValueError, match="image is 97x64 but the crop plan is for 200x100"):
        ResizedImages().pixels(data, 0, plan, False)


def test_pixels_handed_out_do_not_share_memory_with_the_memo() -> None:
    data = Images(photos())
    plan = plan_crop(data.images[3].size, 64, center=True, generator=None)  # the whole image
    memo = ResizedImages()
    first = memo.pixels(data, 3, plan, False)
    first.fill_(0.0)
    assert torch.equal(memo.pixels(data, 3, plan, False), apply_crop(data.images[3], plan,
                                                                      flip=False))
