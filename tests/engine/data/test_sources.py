"""engine.data.sources: each layout users bring loads and prepares to the same content.

Checked as a new user would: an image folder with metadata.csv (not only .jsonl), a json
lines file naming image paths, and a ``datasets`` save_to_disk folder (single split and
DatasetDict). The kohya layout: tests/engine/data/test_caption_files.py.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import datasets
import pytest

from engine.data.errors import DatasetError
from engine.data.layout import open_dataset
from engine.model.embedded.demo_data import NUM_IMAGES, build_demo_data
from engine.task.definition import DatasetArgs
from tests.support.datasets import png, prepare


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return build_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_hash(demo, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("reference")
    return prepare(DatasetArgs(name=str(demo.imagefolder)), tmp / "ds", tmp).content_hash


def _demo_rows(demo) -> list[dict]:
    lines = (demo.imagefolder / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_imagefolder_with_metadata_csv_prepares_like_jsonl(
    demo, demo_hash: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rows = _demo_rows(demo)
    with open(src / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for row in rows:
            (src / row["file_name"]).write_bytes((demo.imagefolder / row["file_name"]).read_bytes())
            writer.writerow([row["file_name"], row["text"]])
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == NUM_IMAGES and manifest.content_hash == demo_hash


def test_json_file_with_relative_image_paths_prepares(
    demo, demo_hash: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "pics").mkdir(parents=True)
    records = []
    for row in _demo_rows(demo):
        (src / "pics" / row["file_name"]).write_bytes(
            (demo.imagefolder / row["file_name"]).read_bytes()
        )
        records.append({"image": f"pics/{row['file_name']}", "text": row["text"]})
    (src / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = prepare(DatasetArgs(name=str(src / "data.jsonl")), tmp_path / "ds", tmp_path)
    assert manifest.count == NUM_IMAGES and manifest.content_hash == demo_hash


def _saved(demo, folder: Path) -> datasets.Dataset:
    """The demo parquet (images embedded) as a datasets.Dataset, to save_to_disk."""
    return datasets.Dataset.from_parquet(str(demo.parquet), cache_dir=str(folder / "cache"))


def test_save_to_disk_folder_prepares_in_place_and_is_left_untouched(
    demo, demo_hash: str, tmp_path: Path
) -> None:
    saved = tmp_path / "saved"
    _saved(demo, tmp_path).save_to_disk(str(saved))
    before = sorted(p.name for p in saved.iterdir())
    args = DatasetArgs(name=str(saved), filters=[{"field": "text", "op": "!=", "value": "x"}])
    manifest = prepare(args, tmp_path / "ds", tmp_path)
    assert manifest.count == NUM_IMAGES
    assert sorted(p.name for p in saved.iterdir()) == before  # no cache or index file added
    plain = prepare(DatasetArgs(name=str(saved)), tmp_path / "ds2", tmp_path)
    assert plain.content_hash == demo_hash


def test_save_to_disk_dataset_dict_gives_its_train_split(demo, tmp_path: Path) -> None:
    table = _saved(demo, tmp_path)
    both = datasets.DatasetDict({"train": table.select(range(3)), "test": table.select([5])})
    both.save_to_disk(str(tmp_path / "saved"))
    manifest = prepare(DatasetArgs(name=str(tmp_path / "saved")), tmp_path / "ds", tmp_path)
    assert manifest.count == 3


def test_save_to_disk_state_naming_a_file_outside_is_refused(demo, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    _saved(demo, tmp_path).save_to_disk(str(saved))
    state = json.loads((saved / "state.json").read_text())
    state["_data_files"] = [{"filename": "../elsewhere.arrow"}]
    (saved / "state.json").write_text(json.dumps(state))
    (tmp_path / "elsewhere.arrow").write_bytes(b"")
    with pytest.raises(DatasetError, match="leads outside the dataset folder"):
        prepare(DatasetArgs(name=str(saved)), tmp_path / "ds", tmp_path)
    assert not (tmp_path / "ds").exists()


def test_save_to_disk_with_broken_state_file_is_a_clear_error(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text("not json")
    with pytest.raises(DatasetError, match="state.json is not a datasets state file"):
        prepare(DatasetArgs(name=str(saved)), tmp_path / "ds", tmp_path)


def test_save_to_disk_with_image_paths_reads_only_inside_it(tmp_path: Path) -> None:
    (tmp_path / "outside.png").write_bytes(png())
    # an Image column would be embedded by save_to_disk: a column of path strings is not
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / "outside.png")], "text": ["x"]})
    table.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DatasetError, match="image path outside the dataset"):
        prepare(DatasetArgs(name=str(tmp_path / "saved")), tmp_path / "ds", tmp_path)


def test_prepared_records_of_every_form_open(demo, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    _saved(demo, tmp_path).save_to_disk(str(saved))
    manifest = prepare(DatasetArgs(name=str(saved)), tmp_path / "ds", tmp_path)
    assert open_dataset(manifest.address).image(0).mode == "RGB"


def test_hub_id_offline_fails_fast_and_says_what_it_tried(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DatasetError, match=r"'someone/no-such-set' \(not a local path; as a Hub"):
        prepare(DatasetArgs(name="someone/no-such-set"), tmp_path / "ds", tmp_path)
    assert time.monotonic() - started < 30  # offline: no retries against an unreachable Hub
    assert not (tmp_path / "ds").exists()
