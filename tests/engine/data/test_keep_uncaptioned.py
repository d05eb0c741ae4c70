"""A task that captions its images keeps the ones without a caption (for the step)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data.errors import DatasetError
from engine.data.layout import open_dataset
from engine.data.prepared import prepare_subsets
from tests.support.datasets import png
from tests.support.engine import make_task

CAPTIONING = {"backend": "transformers", "model": "loraflow/tiny-captioner"}


def kohya_folder(root: Path) -> Path:
    folder = root / "10_sks dog"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(png(color=(1, 2, 3)))
    (folder / "a.txt").write_text("sks dog")
    (folder / "b.png").write_bytes(png(color=(4, 5, 6)))  # no caption file
    return root


def captions(manifest) -> list[list[str]]:
    dataset = open_dataset(manifest.address)
    return [dataset.captions(i) for i in range(len(dataset))]


def test_without_captioning_a_kohya_image_without_caption_file_is_skipped(tmp_path):
    task = make_task(**{"dataset.name": str(kohya_folder(tmp_path / "src"))})
    [manifest] = prepare_subsets(task, str(tmp_path / "data"))
    assert manifest.count == 1 and "b.txt missing" in manifest.skipped[0]["reason"]


def test_with_captioning_it_is_kept_with_an_empty_caption_at_another_address(tmp_path):
    source = str(kohya_folder(tmp_path / "src"))
    plain = prepare_subsets(make_task(**{"dataset.name": source}), str(tmp_path / "data"))[0]
    task = make_task(**{"dataset.name": source, "captioning": CAPTIONING})
    [manifest] = prepare_subsets(task, str(tmp_path / "data"))
    assert captions(manifest) == [["sks dog"], [""]] and manifest.skipped == []
    assert manifest.address != plain.address


def test_with_captioning_an_image_folder_without_any_caption_is_prepared(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(png(color=(i, 0, 0)))
    with pytest.raises(DatasetError):
        prepare_subsets(make_task(**{"dataset.name": str(folder)}), str(tmp_path / "data"))
    task = make_task(**{"dataset.name": str(folder), "captioning": CAPTIONING})
    [manifest] = prepare_subsets(task, str(tmp_path / "data"))
    assert captions(manifest) == [[""]] * 3
