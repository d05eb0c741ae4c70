"""Training with loss masks: a white mask is no mask bit for bit, a masked-out pixel
teaches nothing, masks come from the cache exactly as they are computed live, and a run
split into segments is the one run (engine/train/loss.py, loss_masks.py, cache.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.mask_transforms import crop_mask
from engine.data.prepared import load_dataset_for_task, model_identity
from engine.model.loading import load_base_model, training_device
from engine.train.cache import ensure_cache, latent_key
from engine.train.loss import per_sample_loss
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource
from tests.support.datasets import encoded
from tests.support.engine import checkpoint_bytes, run_chain
from tests.support.mixed_shapes import bucketed_task, mixed_shapes_folder

K = 2
CACHED_CROPS = {"transforms.center_crop": False, "transforms.random_flip": True,
                "train_args.cached_crops": K}
BESIDE = {"dataset.masks": "beside"}


def masked_folder(folder: Path, white: bool) -> Path:
    """The mixed-shapes folder, each image with a mask beside it: all white, or random
    grey blobs (a different one per image)."""
    mixed_shapes_folder(folder)
    for n, image in enumerate(sorted(folder.glob("*.png"))):
        w, h = Image.open(image).size
        if white:
            pixels = np.full((h, w), 255, dtype=np.uint8)
        else:
            coarse = np.random.default_rng(n).integers(0, 256, (h // 8 + 1, w // 8 + 1))
            pixels = np.kron(coarse, np.ones((8, 8)))[:h, :w].astype(np.uint8)
        (folder / f"{image.stem}_mask.png").write_bytes(encoded(Image.fromarray(pixels), "PNG"))
    return folder


@pytest.fixture(scope="module")
def white(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return masked_folder(tmp_path_factory.mktemp("white") / "images", white=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images as ``white`` and ``blobs``, without masks."""
    return mixed_shapes_folder(tmp_path_factory.mktemp("plain") / "images")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return masked_folder(tmp_path_factory.mktemp("blobs") / "images", white=False)


def test_a_white_mask_trains_bit_identically_to_no_mask(
    white: Path, plain: Path, tmp_path: Path
) -> None:
    masked = run_chain(bucketed_task(white, **BESIDE), tmp_path / "masked")
    unmasked = run_chain(bucketed_task(plain), tmp_path / "plain")
    assert checkpoint_bytes(masked[-1].checkpoint) == checkpoint_bytes(unmasked[-1].checkpoint)


def test_a_masked_out_pixel_gives_no_gradient_and_the_loss_is_the_mean_of_mask_times_error(
) -> None:
    g = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 4, 6, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 4, 6, generator=g)
    masks = torch.ones(2, 1, 4, 6)
    masks[:, :, :, :3] = 0.0
    masks[1, :, 0, 5] = 0.25
    loss = per_sample_loss(prediction, target, None, masks)
    error = (prediction - target) ** 2
    assert torch.equal(loss, (error * masks).mean(dim=(1, 2, 3)))
    loss.sum().backward()
    assert prediction.grad is not None
    assert bool((prediction.grad[:, :, :, :3] == 0).all())
    assert bool((prediction.grad[:, :, :, 3:] != 0).all())
    ones = torch.ones(2, 1, 4, 6)
    assert torch.equal(per_sample_loss(prediction, target, None, ones),
                       per_sample_loss(prediction, target, None))


def test_masked_training_from_the_cache_equals_live_and_k_segments_equal_one_run(
    blobs: Path, tmp_path: Path
) -> None:
    task = bucketed_task(blobs, **BESIDE, **CACHED_CROPS)
    cached = run_chain(task, tmp_path / "cached", cache=True)
    live = run_chain(task, tmp_path / "live", cache=False)
    assert cached[0].cache is not None and live[0].cache is None
    assert checkpoint_bytes(cached[-1].checkpoint) == checkpoint_bytes(live[-1].checkpoint)
    split = run_chain(bucketed_task(blobs, **BESIDE, **CACHED_CROPS,
                                    **{"train_args.num_train_steps": 2}),
                      tmp_path / "split", cache=True)
    assert [r.global_step for r in split] == [2, 4, 6]
    assert checkpoint_bytes(split[-1].checkpoint) == checkpoint_bytes(cached[-1].checkpoint)
    unmasked = run_chain(bucketed_task(blobs, **CACHED_CROPS), tmp_path / "unmasked")
    assert checkpoint_bytes(unmasked[-1].checkpoint) != checkpoint_bytes(cached[-1].checkpoint)


def test_the_cache_holds_each_crop_and_orientations_mask_at_latent_size(
    blobs: Path, tmp_path: Path
) -> None:
    task = bucketed_task(blobs, **BESIDE, **CACHED_CROPS)
    data = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    cache = ensure_cache(task, base, data, str(tmp_path / "cache"), model_identity(base))
    assert cache is not None and data.masked
    assert len(cache.latents) == len(data) * K * 2 * 3  # positions x flips x (mean, std, mask)
    source = SampleSource(task, data, base, None)
    plan = TrainingPlan.for_task(task, data)
    for refs in plan.epoch_batches(0):
        for p in source.prepare(list(refs)):
            i, d = p.ref.index, p.decision
            bucket = data.bucket(i)
            cached = cache.mask(i, d.flip, d.crop_choice)
            assert cached is not None and tuple(cached.shape) == (1, bucket.height // 8,
                                                                  bucket.width // 8)
            assert torch.equal(cached, p.mask)
            assert torch.equal(p.mask, crop_mask(data.mask(i), d.crop, flip=d.flip, factor=8))
    assert cache.mask(0, False, None) is None and latent_key(0, False) == "0.0"


def test_mask_min_weight_lifts_black_pixels_and_a_task_without_masks_has_none(
    blobs: Path, plain: Path
) -> None:
    task = bucketed_task(blobs, **BESIDE, **{"dataset.mask_min_weight": 0.25,
                                             "train_args.cache": "off"})
    data = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    source = SampleSource(task, data, base, None)
    refs = list(next(iter(TrainingPlan.for_task(task, data).epoch_batches(0))))
    samples = source.prepare(refs)
    batch = source.batch(samples)
    assert batch.masks is not None
    for k, s in enumerate(samples):
        assert torch.equal(batch.masks[k], 0.25 + 0.75 * s.mask)
    assert float(batch.masks.min()) >= 0.25 and float(batch.masks.max()) <= 1.0
    unmasked = bucketed_task(plain, **{"train_args.cache": "off"})
    unmasked_data = load_dataset_for_task(unmasked, None)
    unmasked_source = SampleSource(unmasked, unmasked_data, base, None)
    first = next(iter(TrainingPlan.for_task(unmasked, unmasked_data).epoch_batches(0)))
    prepared = unmasked_source.prepare(list(first))
    assert all(p.mask is None for p in prepared)
    assert unmasked_source.batch(prepared).masks is None
