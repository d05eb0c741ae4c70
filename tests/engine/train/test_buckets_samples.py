"""Samples in aspect-ratio buckets: latent shapes, SDXL time ids, caption rules, loss
weights, and buckets the model cannot train at (engine/train/samples.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.data.buckets import Bucket
from engine.data.prepared import load_dataset_for_task
from engine.data.transforms import apply_crop, plan_crop
from engine.errors import ExitCode
from engine.model.loading import load_base_model, training_device
from engine.train.bucket_sides import BucketSizeError
from engine.train.plan import TrainingPlan
from engine.train.samples import Batch, PreparedSample, SampleSource
from engine.train.seeding import generator
from engine.train.segment import SegmentOptions, run_segment
from tests.support.mixed_shapes import SHAPES, bucketed_task, mixed_shapes_folder

SD1_BUCKETS = {Bucket(48, 80), Bucket(64, 64), Bucket(80, 48)}  # resolution 64, step 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mixed_shapes_folder(tmp_path_factory.mktemp("mixed") / "images")


def epoch_batches(task, cache=None) -> list[tuple[list[PreparedSample], Batch]]:
    """Every micro-batch of epoch 0 as SampleSource prepares and stacks it."""
    data = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    source = SampleSource(task, data, base, cache)
    plan = TrainingPlan.for_task(task, data)
    out = []
    for refs in plan.epoch_batches(0):
        prepared = source.prepare(list(refs))
        out.append((prepared, source.batch(prepared)))
    return out


def test_each_batch_has_the_latent_shape_of_its_one_bucket(folder: Path) -> None:
    task = bucketed_task(folder, **{"train_args.cache": "off"})
    batches = epoch_batches(task)
    seen = set()
    for prepared, batch in batches:
        (bucket,) = {p.decision.crop.bucket for p in prepared}
        seen.add(bucket)
        expected = (len(prepared), 4, bucket.height // 8, bucket.width // 8)
        assert tuple(batch.latents.shape) == expected
        assert tuple(batch.noise.shape) == expected
        for p in prepared:
            assert tuple(p.pixels.shape) == (3, bucket.height, bucket.width)
    assert seen == SD1_BUCKETS
    assert sum(len(p) for p, _ in batches) == 2 * len(SHAPES)  # every image, none dropped


def test_a_task_without_buckets_keeps_square_samples_and_no_sample_weights(folder: Path) -> None:
    task = bucketed_task(folder, **{"train_args.buckets": None})
    for prepared, batch in epoch_batches(task):
        assert tuple(batch.latents.shape[1:]) == (4, 8, 8)
        assert batch.sample_weights is None
        assert all(p.decision.crop.bucket == Bucket(64, 64) for p in prepared)


def test_sdxl_time_ids_are_each_samples_true_size_crop_and_bucket(folder: Path) -> None:
    # tiny-sdxl needs sides that are multiples of 32: resolution 96, step 32 gives
    # 64x128, 96x96 and 128x64; random crop and flip make every crop its own.
    task = bucketed_task(folder, model="loraflow/tiny-sdxl", resolution=96, step=32,
                         **{"transforms.center_crop": False, "transforms.random_flip": True,
                            "train_args.cache": "off"})
    data = load_dataset_for_task(task, None)
    flipped = shifted = 0
    for prepared, batch in epoch_batches(task):
        assert batch.time_ids is not None and batch.time_ids.shape == (len(prepared), 6)
        for p, row in zip(prepared, batch.time_ids.tolist(), strict=True):
            i, ref = p.ref.index, p.ref
            width, height = data.image(i).size  # the file's true size
            bucket = data.bucket(i)
            crop = plan_crop((width, height), bucket, center=False,
                             generator=generator(task.seed, "crop", ref.epoch, ref.key))
            left = crop.left
            if p.decision.flip:
                left = crop.resized_size[1] - crop.left - bucket.width
                flipped += 1
            shifted += (crop.top, crop.left) != (0, 0)
            assert row == [height, width, crop.top, left, bucket.height, bucket.width]
            expected_pixels = apply_crop(data.image(i), crop, flip=p.decision.flip)
            assert torch.equal(p.pixels, expected_pixels)
    assert flipped and shifted  # the check saw flips and crops that are not at the corner


def test_captions_follow_the_subset_rules_and_subsets_weigh_their_samples(
    folder: Path, tmp_path: Path
) -> None:
    other = mixed_shapes_folder(tmp_path / "other", copies=1, seed=50)
    subsets = [
        {"name": str(folder), "loss_weight": 2.0, "captions": {"prefix": "sks, "}},
        {"name": str(other)},
    ]
    task = bucketed_task(folder, **{"dataset": None, "datasets": subsets})
    data = load_dataset_for_task(task, None)
    seen_weights = set()
    for prepared, batch in epoch_batches(task):
        assert batch.sample_weights is not None
        for p, weight in zip(prepared, batch.sample_weights.tolist(), strict=True):
            first = data.subset_of(p.ref.index) == 0
            assert weight == (2.0 if first else 1.0)
            assert p.decision.caption.startswith("sks, ") == first
            seen_weights.add(weight)
    assert seen_weights == {1.0, 2.0}


def test_a_micro_batch_of_two_buckets_is_refused_with_a_clear_message(folder: Path) -> None:
    task = bucketed_task(folder, **{"train_args.cache": "off"})
    data = load_dataset_for_task(task, None)
    source = SampleSource(task, data, load_base_model(task, training_device()), None)
    plan = TrainingPlan.for_task(task, data)
    by_bucket = {}
    for refs in plan.epoch_batches(0):
        by_bucket.setdefault(data.bucket(refs[0].index), refs[0])
    mixed = source.prepare([by_bucket[Bucket(48, 80)], by_bucket[Bucket(80, 48)]])
    with pytest.raises(AssertionError, match="a micro-batch must hold one bucket"):
        source.batch(mixed)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_buckets_the_model_cannot_train_at_are_refused_before_training(
    folder: Path, tmp_path: Path, cache: bool
) -> None:
    task = bucketed_task(folder, model="loraflow/tiny-sdxl", step=16)  # 48x80: not /32
    out = tmp_path / "out"
    opts = SegmentOptions(cache_root=str(tmp_path / "cache") if cache else None, validate=False)
    with pytest.raises(BucketSizeError) as caught:
        run_segment(task, str(out), opts)
    message = str(caught.value)
    assert "bucket 48x80" in message and "loraflow/tiny-sdxl" in message
    assert "multiples of 32 (VAE factor 8 x UNet downsampling 4)" in message
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    assert not (out / "checkpoint").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())



def test_a_subset_resolution_off_the_vae_factor_is_refused_naming_it(folder: Path,
                                                                      tmp_path: Path) -> None:
    task = bucketed_task(folder, **{"train_args.buckets": None, "dataset.resolution": 60})
    with pytest.raises(BucketSizeError, match="resolution 60 of the dataset .* VAE factor 8"):
        run_segment(task, str(tmp_path / "out"), SegmentOptions(validate=False))
