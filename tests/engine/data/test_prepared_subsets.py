"""Preparing every subset of a task: the bucket of each image is in its records when
bucketing is on, and a task without buckets keeps its prepared address and records."""

from __future__ import annotations

import copy
from pathlib import Path

from engine.data.identity import default_dataset_address
from engine.data.layout import open_dataset
from engine.data.prepared import load_dataset_for_task, prepare_subsets
from engine.task.definition import DatasetArgs, TaskDefinition
from engine.task.validation import validate_document
from tests.support.datasets import image_folder, png
from tests.support.engine import BASE_TASK, make_task


def _folder(root: Path, name: str, sizes: list[tuple[int, int]]) -> Path:
    return image_folder(root / name, [(f"{i}.png", png(w, h), f"{name} {i}")
                                      for i, (w, h) in enumerate(sizes)])


def subsets_task(datasets: list[dict], **train_args: object) -> TaskDefinition:
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    doc["datasets"] = datasets
    doc["train_args"].update(train_args)
    return validate_document(doc)


def test_each_subset_is_prepared_and_a_bucketed_one_records_each_bucket(tmp_path: Path) -> None:
    square = _folder(tmp_path, "square", [(64, 64), (64, 64)])
    mixed = _folder(tmp_path, "mixed", [(64, 64), (48, 96), (96, 48)])
    task = subsets_task([
        {"name": str(square)},
        {"name": str(mixed), "repeats": 2, "buckets": {"step": 16}},
    ])
    manifests = prepare_subsets(task, str(tmp_path / "data"))
    assert [m.count for m in manifests] == [2, 3]
    plain, bucketed = (open_dataset(m.address) for m in manifests)
    assert all("bucket" not in plain.record(i) for i in range(len(plain)))
    recorded = [tuple(bucketed.record(i)["bucket"]) for i in range(len(bucketed))]
    data = load_dataset_for_task(task, str(tmp_path / "data"))
    assert recorded == [tuple(data.bucket(2 + i)) for i in range(3)]
    assert len(set(recorded)) == 3  # square, tall, wide
    assert data.subset_hashes == [m.content_hash for m in manifests]


def test_a_task_without_buckets_keeps_its_prepared_address(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "plain", [(64, 64), (32, 48)])
    task = make_task(**{"dataset.name": str(folder)})
    (manifest,) = prepare_subsets(task, str(tmp_path / "data"))
    assert manifest.address == default_dataset_address(DatasetArgs(name=str(folder)),
                                                       str(tmp_path / "data"))
    records = [open_dataset(manifest.address).record(i) for i in range(2)]
    assert all(set(r) == {"file", "captions", "width", "height", "sha256"} for r in records)
