"""The held-out validation loss of a masked run weighs each example's error by its loss
mask exactly as training does; without masks it is the number it always was
(engine/infer/validation_loss.py, engine/train/loss_masks.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.prepared import load_dataset_for_task
from engine.infer.validation_loss import HeldOutSet, held_out_set, validation_loss
from engine.infer.validation_set import validation_items
from engine.model.loading import BaseModel, load_base_model, training_device
from engine.task.definition import TaskDefinition
from engine.train.bucket_sides import vae_factor
from engine.train.loss_masks import batch_weights
from engine.train.plan import SampleRef
from engine.train.samples import SampleSource
from tests.support.datasets import encoded
from tests.support.engine import make_task
from tests.support.mixed_shapes import bucketed_task, mixed_shapes_folder

BESIDE = {"dataset.masks": "beside"}

#: float.hex of validation_loss on the untrained tiny-sd1, recorded with the code as it
#: was before masks entered the validation loss (5668c61): BASE_TASK (demo-shapes), and
#: the bucketed mixed-shapes folder without masks. One pair per kind of machine, as the
#: golden record (another CPU gives other bits: tests/support/golden.py).
UNMASKED_BEFORE = {
    "Intel Xeon, 2 cores (sessions 1-5)": ("0x1.2c451bd000000p+0", "0x1.28fdb12000000p+0"),
    "AMD EPYC, AVX512, torch 2.13.0+cpu": ("0x1.2c451c6000000p+0", "0x1.28fdb1b000000p+0"),
}


def with_masks(folder: Path, kind: str) -> Path:
    """The mixed-shapes folder, each image with a mask beside it: all white, or a white
    subject (the middle half of each side) on a black background."""
    mixed_shapes_folder(folder)
    for image in sorted(folder.glob("*.png")):
        w, h = Image.open(image).size
        pixels = np.full((h, w), 255 if kind == "white" else 0, dtype=np.uint8)
        if kind == "subject":
            pixels[h // 4: h - h // 4, w // 4: w - w // 4] = 255
        (folder / f"{image.stem}_mask.png").write_bytes(encoded(Image.fromarray(pixels), "PNG"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {"plain": mixed_shapes_folder(root / "plain" / "images"),
            "white": with_masks(root / "white" / "images", "white"),
            "subject": with_masks(root / "subject" / "images", "subject")}


@pytest.fixture(scope="module")
def base() -> BaseModel:
    """The untrained tiny-sd1 every task here uses (the loss only reads it)."""
    return load_base_model(make_task(), training_device())


def held_out(task: TaskDefinition) -> tuple[Any, HeldOutSet]:
    data = load_dataset_for_task(task, None)
    return data, held_out_set(task, validation_items(task, data), data)


def loss_of(base: BaseModel, task: TaskDefinition) -> dict[str, Any]:
    _, held = held_out(task)
    return validation_loss(base, base.noise_scheduler.config.prediction_type, held, task.seed)


def test_a_task_without_masks_keeps_the_validation_loss_it_had_before_masks(
    base: BaseModel, folders: dict[str, Path],
) -> None:
    demo = loss_of(base, make_task())
    mixed = loss_of(base, bucketed_task(folders["plain"]))
    assert (demo["loss"].hex(), mixed["loss"].hex()) in UNMASKED_BEFORE.values()
    assert held_out(make_task())[1].loss_weights(0, (8, 8), 8) is None


def test_a_white_mask_gives_exactly_the_unmasked_validation_loss(
    base: BaseModel, folders: dict[str, Path],
) -> None:
    task = bucketed_task(folders["white"], **BESIDE)
    data, held = held_out(task)
    assert data.masked and held.source == "training_subset"
    factor = vae_factor(base)
    size = tuple(side // factor for side in held.examples[0].pixels.shape[1:])
    weights = held.loss_weights(0, size, factor)
    assert weights is not None and weights.shape == (1, 1, *size)  # the mask path ran
    assert bool((weights == 1.0).all())
    assert loss_of(base, task) == loss_of(base, bucketed_task(folders["plain"]))


def test_a_black_background_mask_lowers_the_validation_loss_to_the_subjects_error(
    base: BaseModel, folders: dict[str, Path],
) -> None:
    """The background's error counts for nothing (mask_min_weight 0), for a part of it
    with mask_min_weight 0.25; so the loss of the same images falls accordingly."""
    plain = loss_of(base, bucketed_task(folders["plain"]))
    masked = loss_of(base, bucketed_task(folders["subject"], **BESIDE))
    floored = loss_of(base, bucketed_task(folders["subject"], **BESIDE,
                                          **{"dataset.mask_min_weight": 0.25}))
    assert 0 < masked["loss"] < floored["loss"] < plain["loss"]
    assert all(0 < masked["per_timestep"][t] < plain["per_timestep"][t]
               for t in plain["per_timestep"])


@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_each_held_out_examples_weights_are_the_ones_training_gives_its_sample(
    base: BaseModel, folders: dict[str, Path], floor: float,
) -> None:
    """Training's own sample of each held-out example (center crop, no flip) is weighed
    by the very tensor the validation loss uses: same crop, resize, box average, floor."""
    task = bucketed_task(folders["subject"], **BESIDE, **{"dataset.mask_min_weight": floor,
                                                          "transforms.random_flip": False})
    data, held = held_out(task)
    source = SampleSource(task, data, base, None)
    factor = vae_factor(base)
    for i, index in enumerate(held.indexes):
        (sample,) = source.prepare([SampleRef(epoch=0, index=index)])
        trained = batch_weights([sample], data)
        assert sample.decision.crop == held.examples[i].crop and not sample.decision.flip
        weights = held.loss_weights(i, tuple(sample.noise.shape[1:]), factor)
        assert weights is not None and torch.equal(weights, trained)
        assert float(weights.min()) == floor and float(weights.max()) == 1.0


def test_the_validation_dataset_files_images_have_no_masks(
    base: BaseModel, folders: dict[str, Path], tmp_path: Path,
) -> None:
    Image.new("RGB", (80, 64), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "red", "image": "red.png"}))
    file = {"validation.dataset_file": str(tmp_path / "set.jsonl")}
    masked = bucketed_task(folders["subject"], **BESIDE, **file)
    assert held_out(masked)[1].source == "validation_dataset"
    assert loss_of(base, masked) == loss_of(base, bucketed_task(folders["plain"], **file))
