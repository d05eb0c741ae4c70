"""engine.data.layout: the prepared dataset is committed with the store's protocol and
trusted only when it verifies; images are checked when read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.data.errors import DatasetError
from engine.data.layout import open_dataset
from engine.model.embedded.demo_data import NUM_IMAGES, build_demo_data
from engine.task.definition import DatasetArgs
from tests.support.datasets import png, prepare


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return build_demo_data(tmp_path_factory.mktemp("demo"))


# -- reading -----------------------------------------------------------------------------


def test_open_refuses_unfinished_or_tampered_datasets(demo, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no manifest"):
        open_dataset(str(tmp_path / "nothing"))
    prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    records = tmp_path / "ds" / "records.jsonl"
    records.write_text(records.read_text().replace("red circle", "blue circle"))
    with pytest.raises(DatasetError, match="content_hash"):
        open_dataset(str(tmp_path / "ds"))


def test_modified_image_is_detected_on_read(demo, tmp_path: Path) -> None:
    prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    ds = open_dataset(str(tmp_path / "ds"))
    (tmp_path / "ds" / "images" / "000003.png").write_bytes(png())
    with pytest.raises(DatasetError, match="sha256"):
        ds.image_bytes(3)


def test_image_bytes_are_read_once_and_kept(demo, tmp_path: Path) -> None:
    prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    ds = open_dataset(str(tmp_path / "ds"))
    first = ds.image_bytes(5)
    (tmp_path / "ds" / "images" / "000005.png").unlink()  # storage gone: memory still has it
    assert ds.image_bytes(5) == first
    assert ds.image(5).size == ds.size(5)


# -- the commit protocol -----------------------------------------------------------------


def test_dataset_is_committed_with_the_store_protocol(demo, tmp_path: Path) -> None:
    from engine.data.layout import DATASET
    from engine.store.commit import read_folder_manifest

    manifest = prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    committed = read_folder_manifest(str(tmp_path / "ds"), kind=DATASET)
    assert committed.format == "loraflow-dataset/2"
    assert committed["content_hash"] == manifest.content_hash
    assert len(committed.files) == NUM_IMAGES + 1  # the images and records.jsonl
    records = (tmp_path / "ds" / "records.jsonl").read_bytes()
    assert committed.files["records.jsonl"]["sha256"] == manifest.content_hash
    assert hashlib.sha256(records).hexdigest() == manifest.content_hash


def test_hand_edited_manifest_is_refused_and_prepared_again(demo, tmp_path: Path) -> None:
    args = DatasetArgs(name=str(demo.imagefolder))
    first = prepare(args, tmp_path / "ds", tmp_path)
    path = tmp_path / "ds" / "manifest.json"
    document = json.loads(path.read_text())
    document["count"] = 3
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match="manifest_sha256"):
        open_dataset(str(tmp_path / "ds"))
    assert prepare(args, tmp_path / "ds", tmp_path) == first
    assert len(open_dataset(str(tmp_path / "ds"))) == NUM_IMAGES


def test_a_format_1_folder_or_temporaries_are_not_foreign_files(demo, tmp_path: Path) -> None:
    old = tmp_path / "ds"
    (old / "images").mkdir(parents=True)
    (old / "images" / "000099.png").write_bytes(png())
    (old / "manifest.json").write_text(json.dumps({"format": "loraflow-dataset/1"}))
    (old / ".manifest.json.tmp").write_text("{}")
    (old / "records.jsonl").write_text("{}\n")
    (old / ".records.jsonl.loraflow-tmp-0123").write_bytes(b"half")
    manifest = prepare(DatasetArgs(name=str(demo.imagefolder)), old, tmp_path)
    assert manifest.count == NUM_IMAGES
    assert sorted(p.name for p in old.iterdir()) == ["images", "manifest.json", "records.jsonl"]
    assert not (old / "images" / "000099.png").exists()


def test_a_missing_image_is_named_on_read(demo, tmp_path: Path) -> None:
    prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    ds = open_dataset(str(tmp_path / "ds"))
    (tmp_path / "ds" / "images" / "000004.png").unlink()
    with pytest.raises(DatasetError, match=r"images/000004.png: missing"):
        ds.image_bytes(4)
