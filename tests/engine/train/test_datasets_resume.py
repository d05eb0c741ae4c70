"""Issue 12's acceptance: datasets as users have them still resume exactly, and an epoch
of mixed shapes trains every image.

Two subsets (repeats 2 and 1, a loss weight), aspect-ratio buckets, caption dropout,
tag shuffle with keep_tokens and a prefix, one of several captions: k segments equal one
run, bit for bit, on tiny-sd1 and tiny-sdxl. Segments of 3 steps end mid-epoch and
across the epoch boundary.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data.prepared import load_dataset_for_task
from engine.task.definition import TaskDefinition
from engine.task.validation import validate_document
from engine.train.plan import TrainingPlan
from engine.train.segment import SegmentOptions, run_segment
from tests.support.datasets import encoded, image_folder
from tests.support.engine import BASE_TASK, checkpoint_bytes, make_task, run_chain


def pattern(width: int, height: int, k: int) -> bytes:
    """A PNG with stripes and a gradient that differ per ``k`` (not a flat colour)."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * (3 + k) + y) % 256
    g = (y * (5 + k)) % 256
    b = ((x + y) * 2 + 40 * k) % 256
    pixels = np.stack([r, g, b], axis=-1).astype(np.uint8)
    return encoded(Image.fromarray(pixels, "RGB"), "PNG")


def tagged_folder(root: Path) -> Path:
    """Six images of mixed shapes with comma-tag captions (a trigger word first)."""
    shapes = [(40, 40), (40, 60), (60, 40), (64, 36), (36, 64), (60, 60)]
    tags = ["red", "stripes", "outdoors", "close-up", "night", "blue"]
    items = [(f"t{k}.png", pattern(w, h, k),
              f"sks, {tags[k]}, {tags[(k + 1) % 6]}, {tags[(k + 2) % 6]}")
             for k, (w, h) in enumerate(shapes)]
    return image_folder(root / "tagged", items)


def described_folder(root: Path) -> Path:
    """Five images, each with two captions to pick from."""
    shapes = [(48, 48), (30, 50), (50, 30), (80, 20), (44, 66)]
    items = [(f"d{k}.png", pattern(w, h, 10 + k), [f"a pattern {k}", f"picture number {k}"])
             for k, (w, h) in enumerate(shapes)]
    return image_folder(root / "described", items)


def subsets_task(root: Path, model: str, buckets: dict, **train_args: object) -> TaskDefinition:
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    doc["model"] = {"name": model}
    doc["datasets"] = [
        {"name": str(tagged_folder(root)), "repeats": 2,
         "captions": {"prefix": "photo of ", "dropout": 0.3, "shuffle_tags": True,
                      "keep_tokens": 1}},
        {"name": str(described_folder(root)), "repeats": 1, "loss_weight": 0.5,
         "captions": {"dropout": 0.2}},
    ]
    doc["train_args"].update({"batch_size": 3, "gradient_accumulation_steps": 2,
                              "max_train_steps": 8, "num_train_steps": 8,
                              "buckets": buckets, **train_args})
    return validate_document(doc)


@pytest.mark.parametrize(
    "model, buckets",
    [
        ("loraflow/tiny-sd1", {"step": 16}),  # derived: 48x80, 64x64, 80x48
        ("loraflow/tiny-sdxl", {"step": 32, "sizes": [[32, 64], [64, 64], [64, 32]]}),
    ],
    ids=["tiny-sd1", "tiny-sdxl"],
)
def test_three_segments_with_subsets_buckets_and_caption_rules_equal_one_run_bitwise(
    tmp_path: Path, model: str, buckets: dict
) -> None:
    one = subsets_task(tmp_path / "data", model, buckets)
    split = subsets_task(tmp_path / "data", model, buckets, num_train_steps=3)
    data = load_dataset_for_task(one, str(tmp_path / "prepared"))
    plan = TrainingPlan.for_task(one, data)
    assert len(plan.layout.buckets) == 3 and plan.uses_per_epoch == 6 * 2 + 5
    assert plan.steps_per_epoch < 8  # the 8 steps cross an epoch boundary

    single = run_chain(one, tmp_path / "one")
    chain = run_chain(split, tmp_path / "split")

    assert [r.global_step for r in chain] == [3, 6, 8]
    assert len(single) == 1 and single[0].finished and chain[-1].finished
    assert checkpoint_bytes(single[0].checkpoint) == checkpoint_bytes(chain[-1].checkpoint)
    assert all(r.data == single[0].data for r in chain)
    subsets = single[0].data["subsets"]
    assert [(s["images"], s["repeats"], s["uses"], s["loss_weight"]) for s in subsets] == [
        (6, 2, 12, 1.0), (5, 1, 5, 0.5)]
    assert (single[0].data["images_per_epoch"], single[0].data["batches_per_epoch"]) == (
        plan.uses_per_epoch, plan.micro_batches_per_epoch)


def mixed_shapes_task(root: Path) -> TaskDefinition:
    shapes = {"square": (60, 60), "portrait_2_3": (40, 60), "landscape_3_2": (60, 40),
              "wide_16_9": (96, 54), "tall_9_16": (54, 96), "outlier_1_4": (20, 80)}
    folder = image_folder(root / "mixed", [
        (f"{name}.png", pattern(w, h, k), f"a {name} picture")
        for k, (name, (w, h)) in enumerate(shapes.items())
    ])
    doc = copy.deepcopy(BASE_TASK)
    doc["dataset"] = {"name": str(folder)}
    doc["train_args"].update({"batch_size": 4, "gradient_accumulation_steps": 1,
                              "max_train_steps": None, "num_train_steps": None,
                              "max_train_epochs": 1, "num_train_epochs": 1,
                              "buckets": {"step": 16}})
    return validate_document(doc)


def test_an_epoch_of_mixed_shapes_trains_every_image_as_the_summary_says(
    tmp_path: Path,
) -> None:
    task = mixed_shapes_task(tmp_path / "data")
    result = run_segment(task, str(tmp_path / "run"), SegmentOptions(validate=False))
    assert result.finished

    summary = result.data
    assert summary["images"] == summary["images_per_epoch"] == 6
    assert sum(b["images"] for b in summary["buckets"]) == 6
    assert {b["bucket"]: b["images"] for b in summary["buckets"]} == {
        "48x80": 3, "64x64": 1, "80x48": 2}  # the 1:4 outlier goes to the tallest bucket
    assert summary["skipped"] == 0
    # batches of 4 hold one bucket each: 3 -> 1 batch, 1 -> 1, 2 -> 1, none dropped
    assert summary["batches_per_epoch"] == 3 and result.global_step == 3

    data = load_dataset_for_task(task, None)
    plan = TrainingPlan.for_task(task, data)
    trained = [r for mb in plan.epoch_batches(0) for r in mb]
    assert Counter(r.index for r in trained) == {i: 1 for i in range(6)}
    assert (plan.uses_per_epoch, plan.micro_batches_per_epoch) == (
        summary["images_per_epoch"], summary["batches_per_epoch"])
    for i in range(len(data)):
        assert tuple(data.record(i)["bucket"]) == tuple(data.bucket(i))


def test_a_subset_loss_weight_scales_its_samples_loss_terms(tmp_path: Path) -> None:
    """A weight of 2 doubles every loss term of the first step (same model, same draws),
    exactly: scaling by a power of two is exact in floating point."""
    losses = {}
    for weight in (1.0, 2.0):
        task = make_task(**{"dataset.loss_weight": weight, "train_args.max_train_steps": 1,
                            "train_args.num_train_steps": 1,
                            "train_args.lr_scheduler.lr_warmup_steps": 0})
        seen: list[float] = []
        opts = SegmentOptions(validate=False, on_step=lambda r, seen=seen: seen.append(r.loss))
        run_segment(task, str(tmp_path / str(weight)), opts)
        losses[weight] = seen
    assert losses[2.0] == [2 * x for x in losses[1.0]] and losses[1.0][0] > 0
