"""One batched VAE / text-encoder call gives what encoding one sample at a time gives, bit
for bit, where it is enabled; elsewhere it is not used (engine/train/batched_encode.py)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.model.loading import load_base_model, training_device
from engine.train.batched_encode import CaptionBatcher, VaeBatcher, proven_here
from engine.train.live_encode import frozen
from engine.train.samples import encode_caption, encode_image, placement
from tests.support.engine import make_task


def _base(model: str):
    task = make_task()
    task = task.model_copy(update={"model": task.model.model_copy(update={"name": model})})
    return load_base_model(task, training_device())


@pytest.fixture(scope="module")
def sd1():
    return _base("loraflow/tiny-sd1")


@pytest.fixture(scope="module")
def sdxl():
    return _base("loraflow/tiny-sdxl")


def pixels_like_the_data_path(count: int, height: int, width: int, seed: int,
                              ) -> list[torch.Tensor]:
    """Images laid out as ResizedImages hands them over (HWC uint8 permuted to CHW, scaled
    to [-1, 1]): the strides the live path's VAE calls see."""
    g = torch.Generator().manual_seed(seed)
    hwc = torch.randint(0, 256, (count, height, width, 3), generator=g, dtype=torch.uint8)
    return [x.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0 for x in hwc]


def one_at_a_time(vae, pixels):
    where = placement(vae)
    with frozen():
        return [encode_image(vae, p, where) for p in pixels]


def assert_same_bits(got, want) -> None:
    assert len(got) == len(want)
    for (gm, gs), (wm, ws) in zip(got, want, strict=True):
        assert torch.equal(gm, wm) and torch.equal(gs, ws)


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
@pytest.mark.parametrize(("count", "height", "width"),
                         [(2, 64, 64), (4, 64, 64), (3, 64, 96), (4, 96, 64), (4, 64, 128),
                          (8, 128, 128)])
def test_a_batched_vae_call_gives_each_image_the_bits_it_gets_alone(
        request, model: str, count: int, height: int, width: int) -> None:
    base = request.getfixturevalue(model)
    batcher = VaeBatcher(base.vae)
    for seed in (1, 2):  # the first call records the plan, the second replays it alone
        pixels = pixels_like_the_data_path(count, height, width, seed)
        with frozen():
            got = batcher.encode(pixels, placement(base.vae))
        assert_same_bits(got, one_at_a_time(base.vae, pixels))
    assert all(plan is not None for plan in batcher._plans.values())  # really batched


def test_contiguous_images_and_a_large_one_agree_too(sd1) -> None:
    """Other input strides, and a size where more layers take oneDNN alone."""
    batcher = VaeBatcher(sd1.vae)
    g = torch.Generator().manual_seed(3)
    for height in (64, 256):
        pixels = list(torch.rand((3, 3, height, height), generator=g) * 2 - 1)
        with frozen():
            got = batcher.encode(pixels, placement(sd1.vae))
        assert_same_bits(got, one_at_a_time(sd1.vae, pixels))


def test_images_of_different_layouts_are_encoded_one_by_one(sd1) -> None:
    batcher = VaeBatcher(sd1.vae)
    a, b = pixels_like_the_data_path(2, 64, 64, 4)
    pixels = [a, b.contiguous()]
    with frozen():
        got = batcher.encode(pixels, placement(sd1.vae))
    assert_same_bits(got, one_at_a_time(sd1.vae, pixels))
    assert batcher._plans == {}  # nothing batched, so nothing recorded


def test_batching_is_off_where_it_was_not_proven(sd1) -> None:
    assert proven_here(torch.device("cpu"), torch.float32)
    assert not proven_here(torch.device("cpu"), torch.bfloat16)
    assert not proven_here(torch.device("cuda"), torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not proven_here(torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    sd1.vae.use_tiling = True
    try:
        batcher = VaeBatcher(sd1.vae)
        pixels = pixels_like_the_data_path(2, 64, 64, 5)
        with frozen():
            got = batcher.encode(pixels, placement(sd1.vae))
        assert_same_bits(got, one_at_a_time(sd1.vae, pixels))
        assert batcher._plans == {}
    finally:
        sd1.vae.use_tiling = False


def test_a_plan_that_no_longer_fits_falls_back_to_one_by_one(sd1) -> None:
    batcher = VaeBatcher(sd1.vae)
    pixels = pixels_like_the_data_path(3, 64, 64, 6)
    with frozen():
        batcher.encode(pixels, placement(sd1.vae))
        (key,) = batcher._plans
        batcher._plans[key] = batcher._plans[key][:-1]  # one layer short: diverges
        got = batcher.encode(pixels, placement(sd1.vae))
    assert_same_bits(got, one_at_a_time(sd1.vae, pixels))
    assert batcher._plans[key] is None
    assert torch._C._get_mkldnn_enabled()  # the oneDNN switch is left as it was


def test_images_whose_layers_are_not_whole_vector_steps_are_encoded_one_by_one(sd1) -> None:
    """At 72 px the mid-block holds 16 x 9 x 9 values an image: a batch would move bits."""
    batcher = VaeBatcher(sd1.vae)
    pixels = pixels_like_the_data_path(3, 72, 72, 7)
    with frozen():
        got = batcher.encode(pixels, placement(sd1.vae))
    assert_same_bits(got, one_at_a_time(sd1.vae, pixels))
    assert list(batcher._plans.values()) == [None]


WORDS = ["a", "red", "green", "blue", "square", "circle", "triangle", "on", "white", "gray",
         "background", "photo", "of", "the", "dog", "cat", "sks"]


def test_one_text_encoder_call_gives_each_caption_its_own_bits(sd1) -> None:
    batcher = CaptionBatcher(sd1)
    assert batcher.usable
    rng = random.Random(0)
    for _ in range(40):
        captions = list(dict.fromkeys(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40)))
            for _ in range(rng.randint(2, 8))))
        with frozen():
            got = batcher.encode(captions)
            for caption in captions:
                want = encode_caption(sd1, caption)
                assert got[caption].keys() == want.keys()
                assert all(torch.equal(got[caption][k], want[k]) for k in want)


def test_sdxl_captions_stay_one_by_one(sdxl) -> None:
    """Its pooled projection is a matrix-vector product alone, a matrix product batched."""
    assert not CaptionBatcher(sdxl).usable
