"""A task that captions its images (``captioning``) gets an empty caption column only when
its dataset has no caption column at all; a mistyped ``dataset.caption_column`` is an error,
never every caption silently dropped and re-captioned."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from engine.data.errors import DatasetError
from engine.data.layout import open_dataset
from engine.data.prepared import prepare_subsets
from flows.cli.main import main
from tests.flows.test_cli_caption import CAPTIONING, task_file
from tests.support.datasets import image_folder, png
from tests.support.engine import make_task


def captions(manifest) -> list[list[str]]:
    dataset = open_dataset(manifest.address)
    return [dataset.captions(i) for i in range(len(dataset))]


def captioned_folder(root: Path) -> Path:
    """An image folder whose metadata.jsonl holds its captions under ``text``."""
    return image_folder(root, [("a.png", png(color=(1, 2, 3)), "a red dog"),
                               ("b.png", png(color=(4, 5, 6)), "a blue cat")])


def prepared(tmp_path: Path, source: Path, **dataset: object):
    changes = {f"dataset.{key}": value for key, value in dataset.items()}
    task = make_task(**{"dataset.name": str(source), "captioning": CAPTIONING, **changes})
    [manifest] = prepare_subsets(task, str(tmp_path / "data"))
    return manifest


def test_a_folder_without_metadata_is_prepared_with_empty_captions_to_fill(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(png(color=(i, 0, 0)))
    manifest = prepared(tmp_path, folder)
    assert manifest.count == 3 and captions(manifest) == [[""]] * 3
    assert manifest.empty_captions == 3


def test_class_labels_inferred_from_subfolders_are_no_caption_column(tmp_path):
    folder = tmp_path / "photos"
    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True)
        (folder / label / "p.png").write_bytes(png(color=(len(label), 0, 0)))
    manifest = prepared(tmp_path, folder)
    assert manifest.count == 2 and captions(manifest) == [[""]] * 2


def test_a_rightly_named_caption_column_keeps_its_captions(tmp_path):
    manifest = prepared(tmp_path, captioned_folder(tmp_path / "src"), caption_column="text")
    assert captions(manifest) == [["a red dog"], ["a blue cat"]]
    assert manifest.empty_captions == 0


def test_a_mistyped_caption_column_is_an_error_naming_the_columns_there_are(tmp_path):
    source = captioned_folder(tmp_path / "src")
    with pytest.raises(DatasetError) as caught:
        prepared(tmp_path, source, caption_column="txt")
    message = str(caught.value)
    assert "dataset.caption_column 'txt' is not a column of the dataset" in message
    assert "its columns are: image, text" in message
    assert "captioning adds an empty caption column only" in message


def masked_table(src: Path, *extra: tuple[str, str]) -> Path:
    """A CSV table of one image and its mask (and ``extra`` (column, value) pairs)."""
    (src / "m").mkdir(parents=True)
    (src / "a.png").write_bytes(png(24, 16))
    (src / "m" / "a.png").write_bytes(png(24, 16, color=(255, 255, 255)))
    with open(src / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "mask", *(c for c, _ in extra)],
                                 ["a.png", "m/a.png", *(v for _, v in extra)]])
    return src


def test_a_table_of_images_and_masks_only_is_prepared_with_empty_captions(tmp_path):
    src = masked_table(tmp_path / "src")
    manifest = prepared(tmp_path, src, mask_column="mask")
    assert captions(manifest) == [[""]]
    assert open_dataset(manifest.address).mask(0) is not None


def test_a_table_with_another_column_and_a_mistyped_caption_column_is_an_error(tmp_path):
    src = masked_table(tmp_path / "src", ("prompt", "a dog"))
    with pytest.raises(DatasetError, match=r"'txt'.*its columns are: image, mask, prompt"):
        prepared(tmp_path, src, mask_column="mask", caption_column="txt")


def test_the_cli_says_so_in_one_line_with_the_bad_input_exit_code(tmp_path, capsys):
    task = task_file(tmp_path, dataset={"name": str(captioned_folder(tmp_path / "src")),
                                        "caption_column": "txt"})
    code = main(["caption", str(task), "--data-dir", str(tmp_path / "data"), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "dataset.caption_column 'txt'" in line and "image, text" in line
