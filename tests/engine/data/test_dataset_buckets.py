"""engine.data.dataset.prepare_dataset(buckets=...): each record holds its bucket, the
bucket list joins the source identity, and None changes nothing (address and bytes)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.data.buckets import Bucket, nearest_bucket
from engine.data.dataset import prepare_dataset
from engine.data.identity import default_dataset_address, source_record
from engine.data.layout import open_dataset
from engine.task.definition import DatasetArgs
from tests.support.datasets import image_folder, png

BUCKETS = (Bucket(32, 64), Bucket(48, 48), Bucket(64, 32))


def _source(tmp_path: Path) -> DatasetArgs:
    folder = image_folder(tmp_path / "src", [
        ("tall.png", png(20, 40), "tall"), ("square.png", png(30, 30), "square"),
        ("wide.png", png(50, 20), "wide"),
    ])
    return DatasetArgs(name=str(folder))


def test_each_record_holds_the_bucket_nearest_its_size(tmp_path: Path) -> None:
    args = _source(tmp_path)
    manifest = prepare_dataset(args, str(tmp_path / "ds"), work_dir=tmp_path / "w",
                               buckets=BUCKETS)
    ds = open_dataset(manifest.address)
    got = {ds.captions(i)[0]: ds.record(i)["bucket"] for i in range(len(ds))}
    assert got == {"tall": [32, 64], "square": [48, 48], "wide": [64, 32]}
    assert all(ds.record(i)["bucket"] == list(nearest_bucket(ds.size(i), BUCKETS))
               for i in range(len(ds)))
    source = json.loads((tmp_path / "ds" / "manifest.json").read_text())["source"]
    assert source["bucket_list"] == [[32, 64], [48, 48], [64, 32]]


def test_without_buckets_records_address_and_identity_are_unchanged(tmp_path: Path) -> None:
    args = _source(tmp_path)
    assert source_record(args, None) == source_record(args)
    assert "bucket_list" not in source_record(args)
    assert default_dataset_address(args, "root", None) == default_dataset_address(args, "root")
    assert default_dataset_address(args, "root", BUCKETS) != default_dataset_address(args, "root")
    plain = prepare_dataset(args, str(tmp_path / "a"), work_dir=tmp_path / "w")
    assert all("bucket" not in open_dataset(plain.address).record(i) for i in range(3))


def test_other_buckets_at_the_same_place_are_prepared_again(tmp_path: Path) -> None:
    args = _source(tmp_path)
    dest = str(tmp_path / "ds")
    prepare_dataset(args, dest, work_dir=tmp_path / "w", buckets=BUCKETS)
    again = prepare_dataset(args, dest, work_dir=tmp_path / "w", buckets=(Bucket(48, 48),))
    assert {open_dataset(again.address).record(i)["bucket"][0] for i in range(3)} == {48}
