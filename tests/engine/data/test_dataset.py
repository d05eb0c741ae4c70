"""engine.data.dataset: preparing datasets from every source form into the normalized form.

Bad images: tests/engine/data/test_images.py; reading back and the commit:
tests/engine/data/test_layout.py."""

from __future__ import annotations

import csv
import http.server
import json
import threading
import uuid
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import fsspec
import pytest

import engine.data.dataset as dataset_module
from engine.data.errors import DatasetError
from engine.data.identity import default_dataset_address
from engine.data.layout import DatasetManifest, open_dataset
from engine.model.embedded.demo_data import NUM_IMAGES, build_demo_data, make_sample
from engine.task.definition import DatasetArgs
from tests.support.datasets import image_folder, png, prepare


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return build_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def memory_dest() -> Iterator[str]:
    """A fresh memory:// address, removed afterwards."""
    name = f"test-dataset-{uuid.uuid4().hex}"
    yield f"memory://{name}/ds"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture
def http_base(demo) -> Iterator[str]:
    """Base URL of a local HTTP server serving the demo data folder."""
    handler = partial(_QuietHandler, directory=str(demo.zip.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


# -- the source forms --------------------------------------------------------------------


def test_prepare_from_imagefolder_with_metadata_jsonl(demo, tmp_path: Path) -> None:
    manifest = prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    assert manifest.count == NUM_IMAGES and manifest.skipped == []
    ds = open_dataset(str(tmp_path / "ds"))
    assert len(ds) == NUM_IMAGES
    assert ds.content_hash == manifest.content_hash
    assert ds.captions(0) == [make_sample(0).text]
    assert ds.size(0) == (96, 80) and ds.size(1) == (80, 96)
    assert ds.image_bytes(0) == (demo.imagefolder / "0000.png").read_bytes()  # not re-encoded
    image = ds.image(1)
    assert image.mode == "RGB" and image.size == (80, 96)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "images",
        "manifest.json",
        "records.jsonl",
    ]
    assert (tmp_path / "ds" / "images" / "000023.png").is_file()


def test_prepare_from_parquet_file_into_memory_dest(demo, tmp_path: Path, memory_dest: str) -> None:
    manifest = prepare(DatasetArgs(name=str(demo.parquet)), memory_dest, tmp_path)
    assert manifest.count == NUM_IMAGES
    assert manifest.address == memory_dest
    ds = open_dataset(memory_dest)
    assert ds.captions(2) == [make_sample(2).text]
    assert ds.image(2).size == (96, 80)


def test_prepare_from_zip_url_file_scheme(demo, tmp_path: Path) -> None:
    manifest = prepare(DatasetArgs(url=demo.zip.as_uri()), tmp_path / "ds", tmp_path)
    assert manifest.count == NUM_IMAGES
    assert list((tmp_path / "work").iterdir()) == []  # scratch (download, caches) removed


def test_prepare_from_zip_over_http(demo, tmp_path: Path, http_base: str, memory_dest: str) -> None:
    manifest = prepare(DatasetArgs(url=f"{http_base}/{demo.zip.name}"), memory_dest, tmp_path)
    assert manifest.count == NUM_IMAGES
    assert open_dataset(memory_dest).captions(0) == [make_sample(0).text]


def test_prepare_from_demo_name(tmp_path: Path) -> None:
    manifest = prepare(DatasetArgs(name="loraflow/demo-shapes"), tmp_path / "ds", tmp_path)
    assert manifest.count == NUM_IMAGES


def test_same_content_gives_same_hash_whatever_the_form(demo, tmp_path: Path) -> None:
    hashes = {
        prepare(args, tmp_path / f"ds{i}", tmp_path).content_hash
        for i, args in enumerate(
            [
                DatasetArgs(name=str(demo.imagefolder)),
                DatasetArgs(name=str(demo.parquet)),
                DatasetArgs(url=demo.zip.as_uri()),
            ]
        )
    }
    assert len(hashes) == 1


def test_zip_with_a_top_folder_is_read_from_inside_it(tmp_path: Path) -> None:
    archive = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("my-set/a.png", png())
        zf.writestr("my-set/metadata.jsonl", json.dumps({"file_name": "a.png", "text": "x"}))
    assert prepare(DatasetArgs(url=archive.as_uri()), tmp_path / "ds", tmp_path).count == 1


def test_unsafe_archive_is_a_dataset_error(tmp_path: Path) -> None:
    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.png", png())
    with pytest.raises(DatasetError, match=r"\.\."):
        prepare(DatasetArgs(url=archive.as_uri()), tmp_path / "ds", tmp_path)
    assert not (tmp_path / "ds").exists()


def test_train_split_is_chosen_among_several(tmp_path: Path) -> None:
    image_folder(tmp_path / "src" / "train", [("a.png", png(), "train caption")])
    image_folder(
        tmp_path / "src" / "test",
        [("b.png", png(), "test caption"), ("c.png", png(), "test caption")],
    )
    prepare(DatasetArgs(name=str(tmp_path / "src")), tmp_path / "ds", tmp_path)
    ds = open_dataset(str(tmp_path / "ds"))
    assert len(ds) == 1 and ds.captions(0) == ["train caption"]


def test_archive_inside_an_imagefolder_is_not_unpacked(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", [("a.png", png(), "one")])
    with zipfile.ZipFile(src / "more.zip", "w") as zf:
        zf.writestr("b.png", png())
    assert prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path).count == 1


def test_csv_with_relative_image_paths_and_an_escaping_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pics").mkdir(parents=True)
    (src / "pics" / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    with open(src / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text"])
        writer.writerow(["pics/a.png", "inside"])
        writer.writerow(["../secret.png", "outside"])
        writer.writerow([str(tmp_path / "secret.png"), "absolute outside"])
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == 1
    assert [s["index"] for s in manifest.skipped] == [1, 2]
    assert all("outside the dataset" in s["reason"] for s in manifest.skipped)


# -- idempotence and hashes --------------------------------------------------------------


def test_second_prepare_of_same_source_reuses_the_result(
    demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = DatasetArgs(name=str(demo.imagefolder))
    first = prepare(args, tmp_path / "ds", tmp_path)

    def must_not_load(*a: object, **k: object) -> None:
        raise AssertionError("the source was loaded again")

    monkeypatch.setattr(dataset_module, "load_source", must_not_load)
    assert prepare(args, tmp_path / "ds", tmp_path) == first


def test_other_source_at_same_dest_is_prepared_again(demo, tmp_path: Path) -> None:
    prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    src = image_folder(tmp_path / "src", [("a.png", png(), "one")])
    assert prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path).count == 1
    assert len(list((tmp_path / "ds" / "images").iterdir())) == 1


def test_content_hash_is_stable_and_follows_captions(tmp_path: Path) -> None:
    items = [("a.png", png(color=(1, 2, 3)), "first"), ("b.png", png(color=(4, 5, 6)), "second")]
    one = prepare(
        DatasetArgs(name=str(image_folder(tmp_path / "s1", items))), tmp_path / "d1", tmp_path
    )
    two = prepare(
        DatasetArgs(name=str(image_folder(tmp_path / "s2", items))), tmp_path / "d2", tmp_path
    )
    assert one.content_hash == two.content_hash
    items[1] = ("b.png", items[1][1], "second, edited")
    three = prepare(
        DatasetArgs(name=str(image_folder(tmp_path / "s3", items))), tmp_path / "d3", tmp_path
    )
    assert three.content_hash != one.content_hash


def test_manifest_round_trips_through_json(demo, tmp_path: Path) -> None:
    manifest = prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    assert DatasetManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_default_address_is_stable_per_source_and_hides_credentials() -> None:
    secret = DatasetArgs(url="https://me:hunter2@h.example/set.zip?X-Amz-Signature=s3cr3t")
    address = default_dataset_address(secret, "s3://bucket/datasets/")
    assert address == default_dataset_address(secret, "s3://bucket/datasets")
    assert address.startswith("s3://bucket/datasets/dataset-")
    assert "hunter2" not in address and "s3cr3t" not in address
    other = DatasetArgs(url="https://h.example/set.zip", caption_column="caption")
    assert default_dataset_address(other, "s3://bucket/datasets") != address


def test_manifest_source_has_no_credentials(tmp_path: Path, demo, http_base: str) -> None:
    url = f"{http_base}/{demo.zip.name}?token=s3cr3t".replace("://", "://me:pw@")
    prepare(DatasetArgs(url=url), tmp_path / "ds", tmp_path)
    assert "s3cr3t" not in (tmp_path / "ds" / "manifest.json").read_text()


# -- validation --------------------------------------------------------------------------


def test_missing_column_error_names_existing_columns(demo, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="'caption'.*columns are: image, text"):
        prepare(
            DatasetArgs(name=str(demo.imagefolder), caption_column="caption"),
            tmp_path / "ds",
            tmp_path,
        )
    with pytest.raises(DatasetError, match="'picture'.*image, text"):
        prepare(
            DatasetArgs(name=str(demo.parquet), image_column="picture"), tmp_path / "ds", tmp_path
        )
    assert not (tmp_path / "ds").exists()


def test_list_captions_are_kept_whole(tmp_path: Path) -> None:
    src = image_folder(
        tmp_path / "src", [("a.png", png(), ["one", "uno"]), ("b.png", png(), ["two"])]
    )
    prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    ds = open_dataset(str(tmp_path / "ds"))
    assert [ds.captions(0), ds.captions(1)] == [["one", "uno"], ["two"]]


def test_empty_captions_are_allowed_and_counted(tmp_path: Path) -> None:
    src = image_folder(
        tmp_path / "src", [("a.png", png(), "cat"), ("b.png", png(), ""), ("c.png", png(), None)]
    )
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == 3 and manifest.empty_captions == 2
    assert open_dataset(str(tmp_path / "ds")).captions(2) == [""]


def test_caption_column_without_any_text_is_an_error(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", [("a.png", png(), ""), ("b.png", png(), "  ")])
    with pytest.raises(DatasetError, match="no non-empty caption"):
        prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)


def test_non_text_caption_column_is_an_error(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", [("a.png", png(), 3), ("b.png", png(), 4)])
    with pytest.raises(DatasetError, match="expected text"):
        prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)


def test_non_image_column_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.jsonl").write_text(json.dumps({"image": 5, "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match="does not hold images"):
        prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)


def test_foreign_files_at_dest_are_not_overwritten(demo, tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "thesis.pdf").write_bytes(b"precious")
    with pytest.raises(DatasetError, match="thesis.pdf"):
        prepare(DatasetArgs(name=str(demo.imagefolder)), tmp_path / "ds", tmp_path)
    assert (tmp_path / "ds" / "thesis.pdf").read_bytes() == b"precious"
