"""DreamBooth class images from the tiny SD1 model: the same bytes every time, a killed
step resumes with only the missing images, a re-run generates nothing, and the address
follows everything that decides the pixels."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data.errors import DatasetError
from engine.data.layout import open_dataset
from engine.infer.class_images import (
    CLASS_IMAGES_DIR,
    ensure_class_subset,
    ensure_generated,
    fingerprint,
    generation_key,
)
from tests.support.datasets import image_folder, png
from tests.support.engine import make_task

pytestmark = pytest.mark.timeout(300)

DREAMBOOTH = {"class_prompt": "a shape", "num_class_images": 3, "num_inference_steps": 2,
              "batch_size": 2, "resolution": 32}


def _task(**changes: object):
    return make_task(dreambooth={**DREAMBOOTH, **changes})


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_two_roots_get_identical_bytes(tmp_path: Path) -> None:
    task = _task()
    first = ensure_generated(task, str(tmp_path / "a"), 3)
    second = ensure_generated(task, str(tmp_path / "b"), 3)
    assert (first.generated, second.generated) == (3, 3)
    a, b = _pngs(Path(first.address)), _pngs(Path(second.address))
    assert list(a) == ["000000.png", "000001.png", "000002.png"]
    assert a == b
    assert len(set(a.values())) == 3  # each image from its own generator


def test_a_killed_step_resumes_with_the_missing_images_only(tmp_path: Path) -> None:
    task = _task()
    done = ensure_generated(task, str(tmp_path), 3)
    before = _pngs(Path(done.address))
    for name in ("000001.png", "000002.png"):  # as if killed after the first image
        (Path(done.address) / name).unlink()
    resumed = ensure_generated(task, str(tmp_path), 3)
    assert (resumed.generated, resumed.reused) == (2, 1)
    assert _pngs(Path(resumed.address)) == before  # groups are fixed: same bytes


def test_a_rerun_generates_nothing(tmp_path: Path) -> None:
    task = _task()
    done = ensure_generated(task, str(tmp_path), 3)
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(done.address).glob("*.png")}
    again = ensure_generated(task, str(tmp_path), 3)
    assert (again.generated, again.reused) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in Path(done.address).glob("*.png")} == stamps


@pytest.mark.parametrize("change", [
    {"class_prompt": "a circle"}, {"seed": 3}, {"num_inference_steps": 3},
    {"guidance_scale": 2.0}, {"negative_prompt": "blurry"}, {"resolution": 40},
    {"batch_size": 1},
])
def test_fingerprint_follows_what_decides_the_pixels(change: dict) -> None:
    assert fingerprint(generation_key(_task(**change), 3)) != fingerprint(
        generation_key(_task(), 3))


def test_fingerprint_follows_count_model_and_task_seed() -> None:
    base = fingerprint(generation_key(_task(), 3))
    assert fingerprint(generation_key(_task(), 4)) != base
    assert fingerprint(generation_key(make_task(seed=8, dreambooth=DREAMBOOTH), 3)) != base
    assert fingerprint(generation_key(
        make_task(**{"model.revision": "v2"}, dreambooth=DREAMBOOTH), 3)) != base
    # the loss weight only weighs the images: the same images serve it
    assert fingerprint(generation_key(_task(prior_loss_weight=0.5), 3)) == base


def test_class_subset_is_a_prepared_dataset_captioned_with_the_class_prompt(
        tmp_path: Path) -> None:
    found = ensure_class_subset(_task(), str(tmp_path))
    assert (found.generated, found.reused, found.from_folder) == (3, 0, 0)
    data = open_dataset(found.manifest.address)
    assert len(data) == 3
    assert [data.captions(i) for i in range(3)] == [["a shape"]] * 3
    assert data.size(0) == (32, 32)
    again = ensure_class_subset(_task(), str(tmp_path))
    assert (again.generated, again.reused) == (0, 3)
    assert again.manifest == found.manifest


def test_class_data_dir_images_come_first_and_only_the_rest_is_generated(
        tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "dogs", [
        ("a.png", png(40, 40, (200, 10, 10)), "x"), ("b.png", png(40, 40, (10, 200, 10)), "x")])
    found = ensure_class_subset(_task(class_data_dir=str(folder)), str(tmp_path / "data"))
    assert (found.from_folder, found.generated) == (2, 1)
    data = open_dataset(found.manifest.address)
    assert data.image_bytes(0) == (folder / "a.png").read_bytes()
    assert data.size(2) == (32, 32)  # the generated one
    assert len(list((tmp_path / "data" / CLASS_IMAGES_DIR).glob("*/*.png"))) == 1


def test_too_few_folder_images_without_generation_is_a_clear_error(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "dogs", [("a.png", png(40, 40, (1, 2, 3)), "x")])
    task = _task(class_data_dir=str(folder), generate=False)
    with pytest.raises(DatasetError, match="holds 1 usable image.*num_class_images is 3"):
        ensure_class_subset(task, str(tmp_path / "data"))


def test_schema_refuses_bad_dreambooth_settings() -> None:
    from engine.task.validation import TaskValidationError

    with pytest.raises(TaskValidationError, match="num_class_images"):
        _task(num_class_images=0)
    with pytest.raises(TaskValidationError, match="must come from somewhere"):
        _task(generate=False)
    with pytest.raises(TaskValidationError, match="prior_loss_weight"):
        _task(prior_loss_weight=0)
