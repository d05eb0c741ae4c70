"""The demo-shapes data loads through ``datasets`` in all three forms, byte-identically."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path, PurePosixPath

import datasets
import pytest
from PIL import Image

from engine.model.embedded import registry
from engine.model.embedded.demo_data import (
    BACKGROUNDS,
    COLORS,
    DEMO_DATA_VERSION,
    IMAGE_SIZES,
    METADATA_FILENAME,
    NUM_IMAGES,
    SHAPES,
    DemoDataPaths,
    build_demo_data,
)


def _digests(paths: DemoDataPaths) -> dict[str, str]:
    files = [paths.parquet, paths.zip, *sorted(paths.imagefolder.iterdir())]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _load(kind: str, paths: DemoDataPaths) -> datasets.Dataset:
    if kind == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=str(paths.imagefolder), split="train")
    if kind == "parquet":
        return datasets.load_dataset("parquet", data_files=str(paths.parquet), split="train")
    return datasets.load_dataset("imagefolder", data_files=str(paths.zip), split="train")


@pytest.mark.parametrize("kind", ["imagefolder", "parquet", "zip"])
def test_each_form_loads_24_rows_of_image_and_text(kind: str, demo_data: DemoDataPaths) -> None:
    dataset = _load(kind, demo_data)
    assert dataset.num_rows == NUM_IMAGES
    assert set(dataset.column_names) == {"image", "text"}
    assert isinstance(dataset.features["image"], datasets.Image)
    first = dataset[0]
    assert isinstance(first["image"], Image.Image)
    assert first["text"] == "a red circle on a white background"


def test_all_forms_hold_the_same_captions_and_pixels(demo_data: DemoDataPaths) -> None:
    loaded = [_load(kind, demo_data) for kind in ("imagefolder", "parquet", "zip")]
    reference = loaded[0]
    for other in loaded[1:]:
        assert other["text"] == reference["text"]
        for i in (0, NUM_IMAGES - 1):
            assert other[i]["image"].tobytes() == reference[i]["image"].tobytes()


def test_images_are_non_square_rgb_in_both_orientations(demo_data: DemoDataPaths) -> None:
    sizes = set()
    for png in sorted(demo_data.imagefolder.glob("*.png")):
        with Image.open(png) as image:
            assert image.mode == "RGB"
            assert image.width != image.height
            sizes.add(image.size)
    assert sizes == set(IMAGE_SIZES)


def test_captions_name_colour_shape_and_background_without_repeats(
    demo_data: DemoDataPaths,
) -> None:
    texts = _load("imagefolder", demo_data)["text"]
    assert len(set(texts)) == NUM_IMAGES
    for text in texts:
        words = text.split()
        assert words[0] == "a" and words[3:5] == ["on", "a"] and words[-1] == "background"
        assert words[1] in COLORS and words[2] in SHAPES and words[5] in BACKGROUNDS


def test_zip_entries_are_relative_files_at_archive_root(demo_data: DemoDataPaths) -> None:
    with zipfile.ZipFile(demo_data.zip) as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    assert METADATA_FILENAME in names
    assert len(names) == NUM_IMAGES + 1
    for info in infos:
        path = PurePosixPath(info.filename)
        assert not path.is_absolute() and ".." not in path.parts and "\\" not in info.filename
        assert len(path.parts) == 1  # no top folder
        assert info.date_time == (1980, 1, 1, 0, 0, 0)


def test_rebuild_gives_byte_identical_files(demo_data: DemoDataPaths, tmp_path: Path) -> None:
    rebuilt = build_demo_data(tmp_path / "again")
    assert rebuilt == DemoDataPaths.at(tmp_path / "again")
    assert _digests(rebuilt) == _digests(demo_data)


def test_demo_shapes_id_resolves_to_the_cached_imagefolder(
    demo_data: DemoDataPaths, loraflow_home: Path
) -> None:
    root = loraflow_home / "embedded" / "loraflow" / "demo-shapes" / f"v{DEMO_DATA_VERSION}"
    assert demo_data.imagefolder.parent == root
    assert registry.resolve_dataset("loraflow/demo-shapes") == str(demo_data.imagefolder)
    assert registry.is_embedded("loraflow/demo-shapes")
