"""A dataset of images of mixed shapes, as users have them, and tasks that bucket it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.task.definition import TaskDefinition
from engine.task.validation import validate_document
from tests.support.datasets import encoded, image_folder
from tests.support.engine import BASE_TASK

#: (width, height) of each shape: 1:1, 2:3, 3:2, 16:9, 9:16 and a 1:4 outlier.
SHAPES: dict[str, tuple[int, int]] = {
    "square": (64, 64),
    "portrait": (64, 96),
    "landscape": (96, 64),
    "wide": (160, 90),
    "tall": (90, 160),
    "outlier": (40, 160),
}


def noise_png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), "PNG")


def mixed_shapes_folder(folder: Path, copies: int = 2, seed: int = 0) -> Path:
    """An imagefolder with ``copies`` noise images of every shape in :data:`SHAPES`,
    captioned "<shape> <k>"."""
    items = []
    for k in range(copies):
        for n, (name, (w, h)) in enumerate(SHAPES.items()):
            items.append((f"{name}_{k}.png", noise_png(w, h, seed + 100 * k + n), f"{name} {k}"))
    return image_folder(folder, items)


def bucketed_task(folder: Path, *, model: str = "loraflow/tiny-sd1", resolution: int = 64,
                  step: int = 16, **changes: Any) -> TaskDefinition:
    """BASE_TASK on ``folder`` with train_args.buckets of ``step``, plus dotted changes."""
    doc = copy.deepcopy(BASE_TASK)
    doc["model"] = {"name": model}
    doc["dataset"] = {"name": str(folder)}
    doc["train_args"].update({"resolution": resolution, "buckets": {"step": step},
                              "batch_size": 2, "gradient_accumulation_steps": 1,
                              "num_train_steps": 6, "max_train_steps": 6})
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return validate_document(doc)
