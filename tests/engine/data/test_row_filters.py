"""engine.data.row_filters: DatasetArgs.filters applied to a source's rows before any image
work, the rows left out counted in the manifest, bad filters a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from engine.data.errors import DatasetError
from engine.data.layout import open_dataset
from engine.task.definition import DatasetArgs
from tests.support.datasets import png, prepare


def _parquet(path: Path, rows: list[dict]) -> Path:
    """A parquet file with embedded images and the given extra columns per row."""
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(16 + i, 16), "path": None} for i in range(len(rows))],
         **columns},
    ).cast_column("image", datasets.Image())
    table.to_parquet(str(path))
    return path


def _manifest(dest: Path) -> dict:
    return json.loads((dest / "manifest.json").read_text())


def test_parquet_rows_are_filtered_before_image_work_and_counted(tmp_path: Path) -> None:
    rows = [{"text": f"c{i}", "aesthetic_score": s} for i, s in enumerate([3.0, 5.0, 4.4, 6.1])]
    src = _parquet(tmp_path / "data.parquet", rows)
    args = DatasetArgs(name=str(src),
                       filters=[{"field": "aesthetic_score", "op": ">", "value": 4.5}])
    manifest = prepare(args, tmp_path / "ds", tmp_path)
    ds = open_dataset(manifest.address)
    assert [ds.captions(i) for i in range(len(ds))] == [["c1"], ["c3"]]
    assert _manifest(tmp_path / "ds")["filtered_out"] == 2


def test_skipped_rows_keep_their_source_row_after_filtering(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    (src / "b.png").write_bytes(b"not an image")
    (src / "c.png").write_bytes(png())
    meta = [{"file_name": "a.png", "text": "a", "keep": False},
            {"file_name": "b.png", "text": "b", "keep": True},
            {"file_name": "c.png", "text": "c", "keep": True}]
    (src / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    args = DatasetArgs(name=str(src), filters=[{"field": "keep", "op": "==", "value": True}])
    manifest = prepare(args, tmp_path / "ds", tmp_path)
    assert manifest.count == 1
    assert [(s["index"], s["file"]) for s in manifest.skipped] == [(1, "b.png")]


def test_filter_on_a_field_some_rows_lack(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    meta = [{"file_name": "a.png", "text": "a", "meta": {"score": 9}},
            {"file_name": "b.png", "text": "b", "meta": {}}]
    for m in meta:
        (src / m["file_name"]).write_bytes(png())
    (src / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    rule = {"field": "meta.score", "op": ">=", "value": 5}
    with pytest.raises(DatasetError, match="'meta.score' is missing in row 1"):
        prepare(DatasetArgs(name=str(src), filters=[rule]), tmp_path / "ds", tmp_path)
    assert not (tmp_path / "ds").exists()  # nothing committed
    kept = prepare(DatasetArgs(name=str(src), filters=[{**rule, "missing": "exclude"}]),
                   tmp_path / "ds", tmp_path)
    assert kept.count == 1


def test_filters_leaving_nothing_are_an_error_listing_the_columns(tmp_path: Path) -> None:
    src = _parquet(tmp_path / "data.parquet", [{"text": "a", "score": 1}])
    args = DatasetArgs(name=str(src), filters=[{"field": "score", "op": ">", "value": 4}])
    with pytest.raises(DatasetError, match=r"left out every one of the 1 rows.*score"):
        prepare(args, tmp_path / "ds", tmp_path)


def test_no_filters_adds_nothing_to_the_manifest(tmp_path: Path) -> None:
    src = _parquet(tmp_path / "data.parquet", [{"text": "a", "score": 1}])
    prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert "filtered_out" not in _manifest(tmp_path / "ds")
