"""Validation prompts are drawn from the captions of every subset; a one-source task
draws exactly the prompts it drew before subsets existed."""

from __future__ import annotations

import copy
from pathlib import Path

from engine.data.layout import open_dataset
from engine.data.prepared import load_dataset_for_task, prepare_subsets
from engine.infer.validation import validation_prompts
from engine.task.validation import validate_document
from tests.support.datasets import image_folder, png
from tests.support.engine import BASE_TASK, make_task


def _folder(root: Path, name: str, n: int) -> str:
    return str(image_folder(root / name, [(f"{i}.png", png(32, 32), f"{name} caption {i}")
                                          for i in range(n)]))


def test_a_one_source_task_draws_the_same_prompts_as_from_its_prepared_dataset(
    tmp_path: Path,
) -> None:
    task = make_task(**{"dataset.name": _folder(tmp_path, "only", 6),
                        "validation.num_images": 4})
    (manifest,) = prepare_subsets(task, str(tmp_path / "data"))
    before = validation_prompts(task, open_dataset(manifest.address))
    assert validation_prompts(task, load_dataset_for_task(task, str(tmp_path / "data"))) == before


def test_prompts_come_from_every_subset(tmp_path: Path) -> None:
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    doc["datasets"] = [{"name": _folder(tmp_path, "cats", 3)},
                       {"name": _folder(tmp_path, "dogs", 3)}]
    doc["validation"]["num_images"] = 6
    task = validate_document(doc)
    prompts = validation_prompts(task, load_dataset_for_task(task, str(tmp_path / "data")))
    assert {p.split()[0] for p in prompts} == {"cats", "dogs"}
    assert len(set(prompts)) == 6  # a permutation of all six captions
