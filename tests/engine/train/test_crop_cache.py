"""Random crop with a cache (train_args.cached_crops): each image's fixed crop positions,
their latents cached per bucket and orientation, the same bits from the cache as live,
exact resume, SDXL time ids of the true crop (engine/train/samples.py, cache.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data.prepared import load_dataset_for_task, model_identity
from engine.model.loading import load_base_model, training_device
from engine.task.validation import TaskValidationError
from engine.train.cache import cache_fingerprint, ensure_cache, latent_key
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource, crop_candidates, crop_top_left
from tests.support.engine import checkpoint_bytes, make_task, run_chain
from tests.support.mixed_shapes import SHAPES, bucketed_task, mixed_shapes_folder

K = 3
CACHED_CROPS = {"transforms.center_crop": False, "transforms.random_flip": True,
                "train_args.cached_crops": K}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mixed_shapes_folder(tmp_path_factory.mktemp("mixed") / "images")


def test_cached_crops_train_the_same_bits_from_the_cache_as_live_and_resume_exactly(
    folder: Path, tmp_path: Path
) -> None:
    task = bucketed_task(folder, **CACHED_CROPS)
    cached = run_chain(task, tmp_path / "cached", cache=True)
    live = run_chain(task, tmp_path / "live", cache=False)
    assert cached[0].cache is not None and live[0].cache is None
    assert checkpoint_bytes(cached[-1].checkpoint) == checkpoint_bytes(live[-1].checkpoint)
    split = run_chain(bucketed_task(folder, **CACHED_CROPS, **{"train_args.num_train_steps": 2}),
                      tmp_path / "split", cache=True)
    assert [r.global_step for r in split] == [2, 4, 6]
    assert checkpoint_bytes(split[-1].checkpoint) == checkpoint_bytes(cached[-1].checkpoint)


def test_cached_latents_are_every_crop_position_and_orientation_at_its_bucket(
    folder: Path, tmp_path: Path
) -> None:
    task = bucketed_task(folder, **CACHED_CROPS)
    data = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    cache = ensure_cache(task, base, data, str(tmp_path / "cache"), model_identity(base))
    assert cache is not None and cache.has_latents and cache.has_text
    assert len(cache.latents) == len(data) * K * 2 * 2  # positions x flips x (mean, std)
    for i in range(len(data)):
        bucket = data.bucket(i)
        for choice in range(K):
            for flip in (False, True):
                mean, std = cache.latent(i, flip, choice)
                assert tuple(mean.shape) == tuple(std.shape) == (4, bucket.height // 8,
                                                                 bucket.width // 8)
    assert latent_key(3, True) == "3.1"  # the center crop's keys are what they always were


def test_each_use_trains_at_one_of_its_images_own_crop_positions(folder: Path) -> None:
    task = bucketed_task(folder, **CACHED_CROPS, **{"train_args.cache": "off"})
    data = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    source = SampleSource(task, data, base, None)
    plan = TrainingPlan.for_task(task, data)
    choices: dict[int, set[int]] = {}
    for epoch in range(4):
        for refs in plan.epoch_batches(epoch):
            for p in source.prepare(list(refs)):
                i = p.ref.index
                own = crop_candidates(data.size(i), data.bucket(i), K, task.seed, i)
                assert p.decision.crop == own[p.decision.crop_choice]
                choices.setdefault(i, set()).add(p.decision.crop_choice)
    assert len(choices) == 2 * len(SHAPES)
    assert any(len(c) > 1 for c in choices.values())  # uses differ in position
    positions = {(c.top, c.left) for i in range(len(data))
                 for c in crop_candidates(data.size(i), data.bucket(i), K, task.seed, i)}
    assert len(positions) > 1  # not all at the corner


def test_sdxl_time_ids_of_a_cached_crop_are_its_true_crop(folder: Path, tmp_path: Path) -> None:
    task = bucketed_task(folder, model="loraflow/tiny-sdxl", resolution=96, step=32,
                         **CACHED_CROPS)
    data = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    cache = ensure_cache(task, base, data, str(tmp_path / "cache"), model_identity(base))
    assert cache is not None and cache.has_latents
    source = SampleSource(task, data, base, cache)
    plan = TrainingPlan.for_task(task, data)
    shifted = 0
    for refs in plan.epoch_batches(0):
        prepared = source.prepare(list(refs))
        assert all(p.pixels is None for p in prepared)  # latents came from the cache
        batch = source.batch(prepared)
        for p, row in zip(prepared, batch.time_ids.tolist(), strict=True):
            i = p.ref.index
            width, height = data.size(i)
            crop = crop_candidates((width, height), data.bucket(i), K, task.seed,
                                   i)[p.decision.crop_choice]
            left = crop.left
            if p.decision.flip:
                left = crop.resized_size[1] - crop.left - crop.bucket.width
            assert (crop.top, left) == crop_top_left(p.decision)
            assert row == [height, width, crop.top, left, crop.bucket.height, crop.bucket.width]
            shifted += (crop.top, crop.left) != (0, 0)
    assert shifted


def test_cached_crops_with_center_crop_are_refused_naming_the_field() -> None:
    with pytest.raises(TaskValidationError, match="cached_crops is for random crop"):
        make_task(**{"train_args.cached_crops": 2})


def test_fingerprint_covers_the_number_of_cached_crops() -> None:
    plain = make_task(**{"transforms.center_crop": False})
    two = make_task(**{"transforms.center_crop": False, "train_args.cached_crops": 2})
    three = make_task(**{"transforms.center_crop": False, "train_args.cached_crops": 3})
    prints = {cache_fingerprint(t, "m", "d") for t in (plain, two, three)}
    assert len(prints) == 3
