"""engine.data.caption_files: image folders captioned by same-named .txt files (kohya /
OneTrainer), prepared as a new user has them.

Before: ``datasets``' imagefolder ignored the .txt files, so such a folder had no caption
column and preparing it failed with "caption_column 'text' is not a column".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.data.caption_files import is_caption_folder, load_caption_folder
from engine.data.errors import DatasetError
from engine.data.layout import open_dataset
from engine.task.definition import DatasetArgs
from tests.support.datasets import png, prepare


def _folder(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
    return root


def _manifest(dest: Path) -> dict:
    return json.loads((dest / "manifest.json").read_text())


def test_kohya_folder_with_nested_repeat_folders_prepares_with_captions_and_repeats(
    tmp_path: Path,
) -> None:
    src = _folder(tmp_path / "src", {
        "10_sks dog/a.png": png(32, 16, (255, 0, 0)),
        "10_sks dog/a.txt": "sks dog, running\n",
        "10_sks dog/close/b.png": png(16, 32, (0, 255, 0)),
        "10_sks dog/close/b.txt": "\ufeffsks dog, face\nsks dog close up\n",  # BOM, two lines
        "2_reg/c.png": png(20, 20, (0, 0, 255)),
        "2_reg/c.txt": "a dog",
        "d.png": png(24, 24, (9, 9, 9)),
        "d.txt": "plain dog",
        ".hidden/e.png": png(),
        "kohya.npz": b"latent cache kohya writes beside images",
    })
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == 4 and manifest.skipped == []
    ds = open_dataset(str(tmp_path / "ds"))
    by_caption = {tuple(ds.captions(i)): ds.record(i) for i in range(len(ds))}
    assert set(by_caption) == {
        ("sks dog, running",), ("sks dog, face", "sks dog close up"), ("a dog",),
        ("plain dog",),
    }
    assert by_caption[("sks dog, running",)]["repeats"] == 10
    assert by_caption[("sks dog, face", "sks dog close up")]["repeats"] == 10  # innermost NN_
    assert by_caption[("a dog",)]["repeats"] == 2
    assert "repeats" not in by_caption[("plain dog",)]  # absent = 1
    assert ds.image_bytes(0) == (src / "d.png").read_bytes()  # sorted walk: root files first
    report = _manifest(tmp_path / "ds")["caption_files"]
    assert report["repeat_folders"] == {"src/10_sks dog": 10, "src/2_reg": 2}


def test_image_without_caption_file_is_skipped_with_its_reason(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {
        "1.png": png(), "1.txt": "one",
        "12.png": png(),
        "13.png": png(), "13.png.txt": "misnamed",
    })
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == 1
    assert manifest.skipped == [
        {"index": 1, "file": "12.png", "reason": "caption file 12.txt missing"},
        {"index": 2, "file": "13.png",
         "reason": "caption file 13.txt missing (there is 13.png.txt: name it 13.txt)"},
    ]
    assert _manifest(tmp_path / "ds")["caption_files"]["without_image"] == ["13.png.txt"]


def test_caption_file_not_utf8_skips_its_image_naming_file_and_offset(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {
        "a.png": png(), "a.txt": "fine",
        "sub/b.png": png(), "sub/b.txt": "caf\xe9 au lait".encode("latin-1"),
    })
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == 1
    (entry,) = manifest.skipped
    assert entry["file"] == "sub/b.png"
    assert entry["reason"] == (
        "caption file sub/b.txt is not UTF-8 (byte 0xe9 at offset 3); save it as UTF-8"
    )


def test_empty_caption_file_trains_uncaptioned_and_is_listed(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {
        "a.png": png(), "a.txt": "a red square",
        "b.png": png(), "b.txt": "  \n",
    })
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == 2 and manifest.empty_captions == 1 and manifest.skipped == []
    report = _manifest(tmp_path / "ds")["caption_files"]
    assert report["empty"] == ["b.txt"] and report["empty_count"] == 1


def test_folder_without_any_caption_text_is_an_error_that_counts_why(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"a.png": png(), "a.txt": "", "b.png": png()})
    with pytest.raises(DatasetError) as caught:
        prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    message = str(caught.value)
    assert "no image has a caption: 2 image(s), 1 without a .txt file, 1 with an empty one" in (
        message
    )
    assert not (tmp_path / "ds").exists()  # nothing committed


def test_zero_repeat_prefix_is_an_error(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"0_dog/a.png": png(), "0_dog/a.txt": "dog"})
    with pytest.raises(DatasetError, match="folder 'src/0_dog': a repeat prefix of 0"):
        prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)


def test_other_caption_extension_is_used_when_set(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"a.png": png(), "a.caption": "dog", "a.txt": "notes"})
    manifest = prepare(DatasetArgs(name=str(src), caption_extension=".caption"),
                       tmp_path / "ds", tmp_path)
    assert open_dataset(manifest.address).captions(0) == ["dog"]


def test_links_leading_outside_the_folder_are_not_read(tmp_path: Path) -> None:
    outside = _folder(tmp_path / "outside", {"secret.txt": "secret", "x.png": png()})
    src = _folder(tmp_path / "src", {"a.png": png(), "a.txt": "dog", "b.png": png()})
    os.symlink(outside / "secret.txt", src / "b.txt")
    os.symlink(outside / "x.png", src / "c.png")
    (src / "c.txt").write_text("linked image")
    os.symlink(outside, src / "linked_folder")
    rows = load_caption_folder(src, ".txt")
    assert len(rows.images) == 3  # the folder link is not followed
    assert rows.rejected == {1: "b.txt links outside the dataset",
                             2: "c.png links outside the dataset"}


def test_layout_is_recognised_only_without_metadata_or_data_files(tmp_path: Path) -> None:
    kohya = _folder(tmp_path / "k", {"x/a.png": png(), "x/a.txt": "dog"})
    assert is_caption_folder(kohya, ".txt")
    assert not is_caption_folder(_folder(tmp_path / "m", {
        "a.png": png(), "a.txt": "dog", "metadata.jsonl": "{}"}), ".txt")
    assert not is_caption_folder(_folder(tmp_path / "c", {
        "a.png": png(), "a.txt": "dog", "data.csv": "image,text\n"}), ".txt")
    assert not is_caption_folder(_folder(tmp_path / "n", {"a.png": png(), "notes.txt": "x"}),
                                 ".txt")


def test_kohya_folder_inside_a_zip_url_prepares(tmp_path: Path) -> None:
    from tests.support.datasets import make_zip

    archive = make_zip(tmp_path / "k.zip", {
        "set/5_cat/a.png": png(), "set/5_cat/a.txt": "cat",
    })
    manifest = prepare(DatasetArgs(url=archive.as_uri()), tmp_path / "ds", tmp_path)
    # the lone top folders are stepped into: the prefix of the source folder itself counts
    assert open_dataset(manifest.address).record(0)["repeats"] == 5
