"""engine.data.transforms: crop plans and pixels are pure functions of their inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.data.transforms import CropPlan, apply_crop, plan_crop, resized_size, to_rgb


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_center_crop_plan_of_a_96x80_image_at_64() -> None:
    plan = plan_crop((96, 80), 64, center=True, generator=None)
    # shorter side 80 -> 64 (x0.8), longer side 96 * 0.8 = 76.8 -> 77; 13 spare columns
    assert plan == CropPlan(
        original_size=(80, 96), resized_size=(64, 77), top=0, left=6, resolution=64
    )


def test_portrait_image_is_cropped_vertically() -> None:
    plan = plan_crop((80, 96), 64, center=True, generator=None)
    assert (plan.original_size, plan.resized_size, plan.top, plan.left) == (
        (96, 80),
        (77, 64),
        6,
        0,
    )


def test_center_crop_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    plan_crop((96, 80), 64, center=True, generator=generator)
    assert torch.equal(generator.get_state(), before)


@pytest.mark.parametrize("size", [(96, 80), (64, 64), (500, 64), (64, 64 * 9)])
def test_random_crop_consumes_exactly_two_draws(size: tuple[int, int]) -> None:
    """Whatever the image (even square: nothing to choose), the generator moves by two."""
    used = torch.Generator().manual_seed(7)
    plan = plan_crop(size, 64, center=False, generator=used)
    reference = torch.Generator().manual_seed(7)
    top = int(torch.randint(0, plan.resized_size[0] - 64 + 1, (1,), generator=reference))
    left = int(torch.randint(0, plan.resized_size[1] - 64 + 1, (1,), generator=reference))
    assert (plan.top, plan.left) == (top, left)
    assert torch.equal(used.get_state(), reference.get_state())


def test_random_crop_stays_inside_the_resized_image() -> None:
    generator = torch.Generator().manual_seed(0)
    plans = [plan_crop((300, 100), 64, center=False, generator=generator) for _ in range(50)]
    assert all(p.top == 0 and 0 <= p.left <= p.resized_size[1] - 64 for p in plans)
    assert len({p.left for p in plans}) > 10  # actually random


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 1024))
def test_resize_keeps_the_shorter_side_at_resolution(width: int, height: int, res: int) -> None:
    new_h, new_w = resized_size((width, height), res)
    assert min(new_h, new_w) == res
    assert max(new_h, new_w) >= res
    long_side, short_side = max(width, height), min(width, height)
    assert abs(max(new_h, new_w) - long_side * res / short_side) <= 0.5


def test_same_plan_gives_the_same_tensor_bytes() -> None:
    image = noise_image(96, 80)
    plan = plan_crop((96, 80), 64, center=False, generator=torch.Generator().manual_seed(1))
    first = apply_crop(image, plan, flip=False)
    second = apply_crop(image.copy(), plan, flip=False)
    assert first.numpy().tobytes() == second.numpy().tobytes()


def test_flip_is_the_horizontal_mirror() -> None:
    image = noise_image(96, 80, seed=5)
    plan = plan_crop((96, 80), 64, center=True, generator=None)
    plain = apply_crop(image, plan, flip=False)
    flipped = apply_crop(image, plan, flip=True)
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))


def test_output_shape_dtype_and_range() -> None:
    black_white = Image.new("RGB", (96, 80), (0, 0, 0))
    black_white.paste((255, 255, 255), (48, 0, 96, 80))
    plan = plan_crop((96, 80), 64, center=True, generator=None)
    tensor = apply_crop(black_white, plan, flip=False)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0


def test_crop_matches_plain_pil_resize_and_crop() -> None:
    image = noise_image(120, 90, seed=2)
    plan = plan_crop((120, 90), 48, center=False, generator=torch.Generator().manual_seed(4))
    expected = image.resize((plan.resized_size[1], plan.resized_size[0]), Image.Resampling.BILINEAR)
    expected = expected.crop((plan.left, plan.top, plan.left + 48, plan.top + 48))
    expected_tensor = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(apply_crop(image, plan, flip=False), expected_tensor.float())


def test_image_of_another_size_than_planned_is_refused() -> None:
    plan = plan_crop((96, 80), 64, center=True, generator=None)
    with pytest.raises(ValueError, match="crop plan"):
        apply_crop(noise_image(80, 96), plan, flip=False)


def test_to_rgb_handles_alpha_sixteen_bit_and_grey() -> None:
    transparent_red = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(transparent_red).getpixel((0, 0)) == (255, 255, 255)
    half_red = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    assert to_rgb(half_red).getpixel((0, 0)) == (255, 127, 127)
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert [to_rgb(sixteen).getpixel((x, 0)) for x in range(3)] == [
        (0, 0, 0),
        (128, 128, 128),
        (255, 255, 255),
    ]
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    rgb = Image.new("RGB", (4, 4))
    assert to_rgb(rgb) is rgb
