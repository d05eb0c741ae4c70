"""Loss masks at preparation: found beside images or in a column, checked, stored with
their records, never examples themselves; decoded to [0, 1]; taken through the image's
crop and flip down to latent size (engine/data/masks.py, mask_transforms.py)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.buckets import Bucket
from engine.data.errors import DatasetError
from engine.data.identity import default_dataset_address, source_record
from engine.data.layout import open_dataset
from engine.data.mask_transforms import crop_mask
from engine.data.masks import check_mask_args, decode_mask
from engine.data.transforms import plan_crop
from engine.task.definition import DatasetArgs
from tests.support.datasets import encoded, image_folder, png, prepare


def grey_png(width: int, height: int, value: int = 255) -> bytes:
    return encoded(Image.new("L", (width, height), value), "PNG")


def half_mask_png(width: int, height: int) -> bytes:
    """White on the left half, black on the right."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, : width // 2] = 255
    return encoded(Image.fromarray(pixels), "PNG")


def test_masks_beside_images_are_stored_with_their_records_and_are_not_examples(
    tmp_path: Path,
) -> None:
    folder = image_folder(tmp_path / "src", [("a.png", png(24, 16), "a"),
                                             ("b.png", png(32, 32), "b")])
    (folder / "a_mask.png").write_bytes(half_mask_png(24, 16))
    (folder / "b_mask.png").write_bytes(grey_png(32, 32, 128))
    manifest = prepare(DatasetArgs(name=str(folder), masks="beside"), tmp_path / "out", tmp_path)
    assert manifest.count == 2 and manifest.skipped == []
    data = open_dataset(manifest.address)
    assert [data.record(i)["mask"] for i in range(2)] == ["masks/000000.png", "masks/000001.png"]
    a = np.asarray(data.mask(0))
    assert a.shape == (16, 24) and a[:, :12].min() == 1.0 and a[:, 12:].max() == 0.0
    assert np.asarray(data.mask(1)) == pytest.approx(128 / 255)


def test_kohya_folder_masks_are_found_and_never_rejected_for_their_missing_caption(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "src" / "10_dog"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes(png(24, 16))
    (folder / "x.txt").write_text("a dog")
    (folder / "x_mask.png").write_bytes(half_mask_png(24, 16))
    manifest = prepare(DatasetArgs(name=str(folder.parent), masks="beside"),
                       tmp_path / "out", tmp_path)
    data = open_dataset(manifest.address)
    assert manifest.count == 1 and manifest.skipped == []
    assert data.record(0)["repeats"] == 10 and data.mask(0).size == (24, 16)


def test_without_masks_a_task_keeps_its_address_and_a_mask_named_file_is_an_image(
    tmp_path: Path,
) -> None:
    args = DatasetArgs(name="some/folder")
    assert not {"masks", "mask_column", "mask_min_weight"} & set(source_record(args))
    assert default_dataset_address(args, "/r") != default_dataset_address(
        DatasetArgs(name="some/folder", masks="beside"), "/r")
    folder = image_folder(tmp_path / "src", [("a.png", png(), "a"), ("a_mask.png", png(), "m")])
    manifest = prepare(DatasetArgs(name=str(folder)), tmp_path / "out", tmp_path)
    data = open_dataset(manifest.address)
    assert manifest.count == 2 and "mask" not in data.record(1) and data.mask(1) is None


def test_a_mask_column_names_each_rows_mask(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png(24, 16))
    (src / "m").mkdir()
    (src / "m" / "a.png").write_bytes(half_mask_png(24, 16))
    with open(src / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "text", "mask"], ["a.png", "a", "m/a.png"]])
    manifest = prepare(DatasetArgs(name=str(src), mask_column="mask"), tmp_path / "out",
                       tmp_path)
    mask = np.asarray(open_dataset(manifest.address).mask(0))
    assert mask[:, :12].min() == 1.0 and mask[:, 12:].max() == 0.0


def _folder_with_mask(tmp_path: Path, mask: bytes | None) -> Path:
    folder = image_folder(tmp_path / "src", [("a.png", png(24, 16), "a")])
    if mask is not None:
        (folder / "a_mask.png").write_bytes(mask)
    return folder


@pytest.mark.parametrize(("mask", "message"), [
    (None, "image a.png has no mask a_mask.png"),
    (grey_png(16, 16), "mask a_mask.png is 16x16 but its image is 24x16"),
    (b"not an image at all", "mask a_mask.png: not a readable image"),
])
def test_a_missing_mismatched_or_unreadable_mask_is_an_error_naming_its_file(
    tmp_path: Path, mask: bytes | None, message: str
) -> None:
    folder = _folder_with_mask(tmp_path, mask)
    with pytest.raises(DatasetError, match=message):
        prepare(DatasetArgs(name=str(folder), masks="beside"), tmp_path / "out", tmp_path)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_mask_settings_that_cannot_be_honoured_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not both"):
        check_mask_args(DatasetArgs(name="x", masks="beside", mask_column="mask"))
    with pytest.raises(DatasetError, match="not read from webdataset shards"):
        check_mask_args(DatasetArgs(shards=["s/0000.tar"], masks="beside"))
    folder = _folder_with_mask(tmp_path, None)
    with pytest.raises(DatasetError, match="mask column 'mask' not found"):
        prepare(DatasetArgs(name=str(folder), mask_column="mask"), tmp_path / "out", tmp_path)


def test_mask_values_are_grey_levels_with_transparency_composited_on_black() -> None:
    cut_out = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    cut_out.paste((255, 255, 255, 255), (0, 0, 4, 8))
    values = np.asarray(decode_mask(encoded(cut_out, "PNG")))
    assert values.dtype == np.float32 and values[:, :4].min() == 1.0 and values[:, 4:].max() == 0
    sixteen = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
    assert np.asarray(decode_mask(encoded(sixteen, "PNG"))) == pytest.approx(0.5, abs=1e-4)
    assert np.asarray(decode_mask(grey_png(8, 8, 0))).max() == 0.0


def test_a_mask_follows_its_images_crop_and_flip_down_to_latent_size_by_area() -> None:
    mask = decode_mask(half_mask_png(128, 64))  # left half white
    plan = plan_crop((128, 64), Bucket(64, 64), center=True, generator=None)  # columns 32..95
    weights = crop_mask(mask, plan, flip=False, factor=8)
    assert tuple(weights.shape) == (1, 8, 8) and weights.dtype == torch.float32
    assert weights[0, 0].tolist() == [1.0] * 4 + [0.0] * 4
    flipped = crop_mask(mask, plan, flip=True, factor=8)
    assert flipped[0, 0].tolist() == [0.0] * 4 + [1.0] * 4
    shifted = dataclasses.replace(plan, left=36)  # latent column 3 covers pixels 60..67
    assert crop_mask(mask, shifted, flip=False, factor=8)[0, 0, 3].item() == 0.5
    for bucket in (Bucket(48, 80), Bucket(80, 48)):
        white = decode_mask(grey_png(90, 160))
        plan = plan_crop((90, 160), bucket, center=True, generator=None)
        assert bool((crop_mask(white, plan, flip=True, factor=8) == 1.0).all())


def test_masks_beside_the_images_a_table_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    (src / "img" / "a.png").write_bytes(png(24, 16))
    (src / "img" / "a_mask.png").write_bytes(half_mask_png(24, 16))
    with open(src / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "text"], ["img/a.png", "a"]])
    manifest = prepare(DatasetArgs(name=str(src), masks="beside"), tmp_path / "out", tmp_path)
    assert np.asarray(open_dataset(manifest.address).mask(0))[:, 12:].max() == 0.0
