"""Bucket lists, nearest buckets and cover sizes (engine/data/buckets.py), and crops to a
bucket (engine/data/transforms.py)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.buckets import Bucket, BucketError, bucket_list, cover_size, nearest_bucket
from engine.data.transforms import apply_crop, plan_crop, resized_size
from engine.task.definition import BucketArgs


def test_no_bucket_settings_give_the_one_square_of_the_resolution() -> None:
    assert bucket_list(512, None) == (Bucket(512, 512),)


def test_derived_buckets_are_multiples_of_step_within_area_and_aspect_ratio() -> None:
    buckets = bucket_list(64, BucketArgs(step=16))
    assert buckets == (Bucket(48, 80), Bucket(64, 64), Bucket(80, 48))
    wide = bucket_list(1024, BucketArgs(step=64, max_aspect_ratio=2.0))
    assert Bucket(1024, 1024) in wide
    for b in wide:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert b.width * b.height <= 1024 * 1024
        assert max(b) <= 2 * min(b)


def test_derived_buckets_are_sorted_tallest_first() -> None:
    buckets = bucket_list(1024, BucketArgs(step=64))
    ratios = [Fraction(b.width, b.height) for b in buckets]
    assert ratios == sorted(ratios)
    assert ratios[0] < 1 < ratios[-1]


def test_a_larger_max_aspect_ratio_admits_narrower_buckets() -> None:
    buckets = bucket_list(64, BucketArgs(step=16, max_aspect_ratio=4.0))
    assert Bucket(32, 128) in buckets and Bucket(128, 32) in buckets
    assert Bucket(32, 128) not in bucket_list(64, BucketArgs(step=16))


def test_buckets_from_ratios_have_about_the_resolutions_area() -> None:
    buckets = bucket_list(1024, BucketArgs(ratios=["1:1", "16:9", "9:16", 1.5]))
    assert buckets == (Bucket(768, 1344), Bucket(1024, 1024), Bucket(1216, 832),
                       Bucket(1344, 768))
    for b in buckets:
        assert b.width * b.height <= 1024 * 1024


def test_explicit_sizes_are_the_buckets() -> None:
    args = BucketArgs(step=32, sizes=[(96, 64), (64, 96), (64, 64), (96, 64)])
    assert bucket_list(64, args) == (Bucket(64, 96), Bucket(64, 64), Bucket(96, 64))


def test_explicit_size_off_the_step_is_refused_naming_it() -> None:
    with pytest.raises(BucketError, match="bucket 72x64 .* step 32"):
        bucket_list(64, BucketArgs(step=32, sizes=[(72, 64)]))


def test_a_resolution_below_the_step_has_no_bucket_and_says_so() -> None:
    with pytest.raises(BucketError, match="no bucket fits resolution 32 with step 64"):
        bucket_list(32, BucketArgs(step=64))


@pytest.mark.parametrize(
    ("size_wh", "expected"),
    [
        ((64, 64), Bucket(64, 64)),  # 1:1
        ((64, 96), Bucket(48, 80)),  # 2:3
        ((96, 64), Bucket(80, 48)),  # 3:2
        ((160, 90), Bucket(80, 48)),  # 16:9
        ((90, 160), Bucket(48, 80)),  # 9:16
        ((40, 160), Bucket(48, 80)),  # 1:4 outlier: the tallest bucket there is
        ((400, 100), Bucket(80, 48)),  # 4:1 outlier: the widest
    ],
)
def test_each_image_goes_to_the_bucket_nearest_its_shape(
    size_wh: tuple[int, int], expected: Bucket
) -> None:
    assert nearest_bucket(size_wh, bucket_list(64, BucketArgs(step=16))) == expected


def test_nearest_bucket_ties_go_to_the_first_in_the_list() -> None:
    buckets = (Bucket(64, 32), Bucket(32, 64))  # 2:1 and 1:2, a square is as far from both
    assert nearest_bucket((50, 50), buckets) == Bucket(64, 32)
    assert nearest_bucket((50, 50), buckets[::-1]) == Bucket(32, 64)


def test_cover_size_keeps_the_aspect_and_covers_the_bucket() -> None:
    assert cover_size((40, 160), Bucket(48, 80)) == (192, 48)  # width binds
    assert cover_size((160, 90), Bucket(80, 48)) == (48, 85)  # height binds
    for size in [(40, 160), (160, 90), (97, 61), (3000, 2000), (7, 5)]:
        for bucket in bucket_list(64, BucketArgs(step=16)):
            h, w = cover_size(size, bucket)
            assert h >= bucket.height and w >= bucket.width
            assert h == bucket.height or w == bucket.width


@pytest.mark.parametrize("resolution", [16, 48, 64, 512])
def test_cover_size_of_a_square_bucket_is_the_square_resize(resolution: int) -> None:
    square = Bucket(resolution, resolution)
    for size in [(1, 1), (64, 64), (96, 80), (80, 96), (300, 100), (7, 1000), (1001, 999)]:
        assert cover_size(size, square) == resized_size(size, resolution)


def test_cover_size_refuses_an_empty_image() -> None:
    with pytest.raises(ValueError, match="bad image size"):
        cover_size((0, 10), Bucket(64, 64))


# -- crops to a bucket (engine/data/transforms.py) --------------------------------------


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(96, 80), (80, 96), (64, 64), (300, 100)])
@pytest.mark.parametrize("center", [True, False])
def test_a_square_bucket_crops_exactly_as_the_square_resolution(
    size: tuple[int, int], center: bool
) -> None:
    image = _noise(*size)
    by_int = plan_crop(size, 64, center=center, generator=torch.Generator().manual_seed(3))
    by_bucket = plan_crop(size, Bucket(64, 64), center=center,
                          generator=torch.Generator().manual_seed(3))
    assert by_int == by_bucket and by_bucket.resolution == 64
    for flip in (False, True):
        assert torch.equal(apply_crop(image, by_int, flip=flip),
                           apply_crop(image, by_bucket, flip=flip))


def test_a_random_crop_to_a_bucket_draws_top_then_left_over_the_extra() -> None:
    size, bucket = (40, 160), Bucket(48, 80)  # covers at 48x192: 112 rows to spare
    plan = plan_crop(size, bucket, center=False, generator=torch.Generator().manual_seed(9))
    reference = torch.Generator().manual_seed(9)
    top = int(torch.randint(0, 192 - 80 + 1, (1,), generator=reference))
    left = int(torch.randint(0, 48 - 48 + 1, (1,), generator=reference))
    assert plan.resized_size == (192, 48) and (plan.top, plan.left) == (top, left)
    assert plan.crop_size == (80, 48) and plan.resolution is None


def test_a_crop_to_a_bucket_is_the_buckets_window_of_the_cover_resize() -> None:
    image, bucket = _noise(160, 90), Bucket(80, 48)
    plan = plan_crop(image.size, bucket, center=True, generator=None)
    assert plan.resized_size == (48, 85) and (plan.top, plan.left) == (0, 2)
    resized = image.resize((85, 48), Image.Resampling.BILINEAR)
    expected = np.asarray(resized.crop((2, 0, 82, 48)), dtype=np.uint8)
    tensor = apply_crop(image, plan, flip=False)
    assert tensor.shape == (3, 48, 80)
    assert torch.equal(tensor, torch.from_numpy(expected.copy()).permute(2, 0, 1) / 127.5 - 1)
    flipped = apply_crop(image, plan, flip=True)
    assert torch.equal(flipped, tensor.flip(-1))
