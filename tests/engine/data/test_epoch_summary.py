"""What a person is shown of an epoch: each bucket's images, uses and batches, each
subset by name, and every image accounted for (none dropped from an underfull bucket)."""

from __future__ import annotations

from pathlib import Path

from engine.data.epoch_summary import epoch_summary, summary_lines
from engine.data.layout import open_dataset
from engine.data.training_data import SubsetSettings, TrainingData
from engine.task.definition import BucketArgs, DatasetArgs, TrainArgs
from tests.support.datasets import image_folder, png, prepare

SHAPES = [(64, 64), (64, 64), (48, 80), (80, 48), (80, 48), (32, 128)]  # 1:1, 3:5, 5:3, 1:4


def _data(tmp_path: Path, sizes: list[tuple[int, int]], name: str) -> object:
    items = [(f"{i}.png", png(w, h), f"{name} {i}") for i, (w, h) in enumerate(sizes)]
    folder = image_folder(tmp_path / name, items)
    manifest = prepare(DatasetArgs(name=str(folder)), tmp_path / f"prepared-{name}", tmp_path)
    return open_dataset(manifest.address)


def _train_args(**changes: object) -> TrainArgs:
    return TrainArgs.model_validate({"resolution": 64, **changes})


def test_every_image_of_a_mixed_set_is_counted_in_its_bucket(tmp_path: Path) -> None:
    train = _train_args(buckets=BucketArgs(step=16, max_aspect_ratio=4.0))
    data = TrainingData([_data(tmp_path, SHAPES, "mixed")],
                        [SubsetSettings.of(DatasetArgs(name="x"), train)])
    summary = epoch_summary(data, batch_size=2, names=["mixed"])
    by_bucket = {b.bucket: b for b in summary.buckets}
    assert sum(b.images for b in summary.buckets) == summary.images == len(SHAPES)
    assert summary.images_per_epoch == len(SHAPES)
    assert {str(data.bucket(i)) for i in range(len(data))} == set(by_bucket)
    # the underfull buckets (one image each) still make a batch: none is dropped
    assert summary.batches_per_epoch == sum(-(-b.uses // 2) for b in summary.buckets)
    assert all(b.batches >= 1 for b in summary.buckets)
    assert len(by_bucket) >= 3


def test_subsets_and_repeats_multiply_uses_per_epoch(tmp_path: Path) -> None:
    train = _train_args()
    a = _data(tmp_path, [(64, 64)] * 3, "a")
    b = _data(tmp_path, [(64, 64)] * 2, "b")
    data = TrainingData([a, b], [SubsetSettings.of(DatasetArgs(name="a"), train),
                                 SubsetSettings.of(DatasetArgs(name="b", repeats=3), train)])
    summary = epoch_summary(data, batch_size=4, names=["a", "b"],
                            skipped=[{"file": "bad.png", "reason": "not an image", "subset": "b"}])
    assert [(s.name, s.images, s.repeats, s.uses) for s in summary.subsets] == [
        ("a", 3, 1, 3), ("b", 2, 3, 6)]
    assert summary.images == 5 and summary.images_per_epoch == 9
    assert [(b.bucket, b.uses, b.batches) for b in summary.buckets] == [("64x64", 9, 3)]
    assert summary.skipped == 1 and summary.skipped_examples[0]["file"] == "bad.png"
    text = "\n".join(summary_lines(summary))
    assert "9 uses per epoch in 3 batches" in text
    assert "subset b: 2 images x3 = 6 uses" in text
    assert "skipped bad.png: not an image" in text
