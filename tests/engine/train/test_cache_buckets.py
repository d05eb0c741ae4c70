"""The cache with buckets and caption rules: latents at each image's bucket, every caption
variant encoded once, tag shuffling bypassing the text cache, and a fingerprint that
stays what it was for tasks using none of it (engine/train/cache.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.data.prepared import load_dataset_for_task, model_identity
from engine.model.loading import load_base_model, training_device
from engine.train.cache import CACHE_FORMAT, cache_fingerprint, caption_key, ensure_cache
from tests.support.engine import checkpoint_bytes, make_task, run_chain
from tests.support.mixed_shapes import SHAPES, bucketed_task, mixed_shapes_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mixed_shapes_folder(tmp_path_factory.mktemp("mixed") / "images")


def test_cached_latents_are_each_image_at_its_bucket(folder: Path, tmp_path: Path) -> None:
    task = bucketed_task(folder)
    data = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    cache = ensure_cache(task, base, data, str(tmp_path / "cache"), model_identity(base))
    assert cache is not None and cache.has_latents
    for i in range(len(data)):
        bucket = data.bucket(i)
        for flip in (False, True):
            mean, std = cache.latent(i, flip)
            assert tuple(mean.shape) == tuple(std.shape) == (4, bucket.height // 8,
                                                             bucket.width // 8)
    assert len({data.bucket(i) for i in range(len(data))}) == 3


def test_bucketed_training_from_cache_equals_live_and_resumes_exactly(
    folder: Path, tmp_path: Path
) -> None:
    task = bucketed_task(folder)
    cached = run_chain(task, tmp_path / "cached", cache=True)
    live = run_chain(task, tmp_path / "live", cache=False)
    assert cached[0].cache is not None and live[0].cache is None
    assert checkpoint_bytes(cached[-1].checkpoint) == checkpoint_bytes(live[-1].checkpoint)
    split = run_chain(bucketed_task(folder, **{"train_args.num_train_steps": 2}),
                      tmp_path / "split", cache=True)
    assert [r.global_step for r in split] == [2, 4, 6]
    assert checkpoint_bytes(split[-1].checkpoint) == checkpoint_bytes(cached[-1].checkpoint)


def test_text_cache_holds_every_caption_variant_including_the_dropped_one(
    folder: Path, tmp_path: Path
) -> None:
    rules = {"prefix": "sks, ", "dropout": 0.5}
    task = bucketed_task(folder, **{"dataset.captions": rules})
    result = run_chain(task, tmp_path / "cached", cache=True)[-1]
    texts = load_file(Path(result.cache) / "text.safetensors")
    keys = {name.split(".")[0] for name in texts}
    variants = {f"sks, {shape} {k}" for shape in SHAPES for k in range(2)} | {""}
    assert keys == {caption_key(v) for v in variants}
    live = run_chain(task, tmp_path / "live", cache=False)[-1]
    assert checkpoint_bytes(result.checkpoint) == checkpoint_bytes(live.checkpoint)


def test_shuffled_tags_bypass_the_text_cache_and_say_so(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = bucketed_task(folder, **{"dataset.captions": {"shuffle_tags": True,
                                                         "tag_separator": " "}})
    with caplog.at_level(logging.INFO, logger="engine.train.cache"):
        result = run_chain(task, tmp_path / "cached", cache=True)[-1]
    assert {p.name for p in Path(result.cache).iterdir()} >= {"latents.safetensors"}
    assert not (Path(result.cache) / "text.safetensors").exists()
    assert "shuffles caption tags: captions are encoded live" in caplog.text
    live = run_chain(task, tmp_path / "live", cache=False)[-1]
    assert checkpoint_bytes(result.checkpoint) == checkpoint_bytes(live.checkpoint)


def _fingerprint_before_buckets(task, model_identity: str, dataset_hash: str) -> str:
    """The fingerprint as it was computed before subsets and buckets existed."""
    ta = task.train_args
    key = {
        "format": CACHE_FORMAT,
        "model": [task.model.name, task.model.revision, task.model.variant, task.model.vae,
                  model_identity],
        "precision": task.mixed_precision,
        "text": ta.cache == "auto" and task.lora.text_encoder is None,
        "latents": ta.cache == "auto" and task.transforms.center_crop,
        "resolution": ta.resolution,
        "center_crop": task.transforms.center_crop,
        "random_flip": task.transforms.random_flip,
        "dataset": dataset_hash,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


@pytest.mark.parametrize(
    "changes",
    [{}, {"transforms.center_crop": False}, {"lora.text_encoder": {"rank": 2}},
     {"train_args.resolution": 128}],
    ids=["base", "random-crop", "text-lora", "resolution"],
)
def test_fingerprint_of_a_task_without_new_options_is_unchanged(changes: dict) -> None:
    task = make_task(**changes)
    assert cache_fingerprint(task, "m", "d") == _fingerprint_before_buckets(task, "m", "d")


@pytest.mark.parametrize(
    "changes",
    [{"train_args.buckets": {"step": 16}},
     {"train_args.buckets": {"step": 16, "max_aspect_ratio": 4}},
     {"dataset.buckets": {"sizes": [[64, 64], [64, 128]]}},
     {"dataset.resolution": 128},
     {"dataset.captions": {"prefix": "sks "}},
     {"dataset.captions": {"dropout": 0.1}}],
    ids=["buckets", "aspect-ratio", "subset-sizes", "subset-resolution", "prefix", "dropout"],
)
def test_fingerprint_covers_buckets_resolutions_and_caption_rules(changes: dict) -> None:
    plain = cache_fingerprint(make_task(), "m", "d")
    assert cache_fingerprint(make_task(**changes), "m", "d") != plain


def test_bucketed_training_with_data_loader_workers_equals_without(
    folder: Path, tmp_path: Path
) -> None:
    task = bucketed_task(folder, **{"transforms.center_crop": False})  # live crops in workers
    alone = run_chain(task, tmp_path / "alone", cache=True)
    workers = run_chain(bucketed_task(folder, **{"transforms.center_crop": False,
                                                 "dataloader_num_workers": 2}),
                        tmp_path / "workers", cache=True)
    assert checkpoint_bytes(workers[-1].checkpoint) == checkpoint_bytes(alone[-1].checkpoint)
