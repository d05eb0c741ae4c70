"""A new user's own data, as they have it, trains through ``loraflow run`` (the real CLI, a
child process, the tiny model, two steps): a kohya-layout folder (``img.png`` + ``img.txt``,
a ``2_`` repeat folder, one image without its caption file), an image folder with
``metadata.csv``, a parquet file, a ``datasets`` save_to_disk folder, and webdataset
shards on the real S3 test server.

Before: the kohya folder, the most common layout there is, failed ("caption_column 'text'
is not a column") and a save_to_disk folder was not recognised.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest

from engine.model.embedded.demo_data import build_demo_data
from tests.support.datasets import png
from tests.support.flow import flow_task, subprocess_env
from tests.support.shards import sample, shard_bytes

pytest_plugins = ["tests.support.flow_fixtures", "tests.support.s3_server"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _demo_rows(demo) -> list[tuple[Path, str]]:
    lines = (demo.imagefolder / "metadata.jsonl").read_text().splitlines()
    return [(demo.imagefolder / r["file_name"], r["text"]) for r in map(json.loads, lines)][:6]


def _kohya(demo, root: Path) -> tuple[Path, int, int]:
    """4 images at the top, 2 in ``2_shapes/`` (used twice each), one without a .txt."""
    rows = _demo_rows(demo)
    for i, (image, text) in enumerate(rows):
        folder = root / ("2_shapes" if i >= 4 else "plain")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image.name).write_bytes(image.read_bytes())
        if i != 0:
            (folder / image.name).with_suffix(".txt").write_text(text + "\n")
    return root, 5, 1


def _metadata_csv(demo, root: Path) -> tuple[Path, int, int]:
    root.mkdir()
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for image, text in _demo_rows(demo):
            (root / image.name).write_bytes(image.read_bytes())
            writer.writerow([image.name, text])
    return root, 6, 0


def _parquet(demo, root: Path) -> tuple[Path, int, int]:
    return demo.parquet, len(_demo_rows(demo)) * 4, 0  # the demo's 24 images


def _save_to_disk(demo, root: Path) -> tuple[Path, int, int]:
    table = datasets.Dataset.from_parquet(str(demo.parquet), cache_dir=str(root.parent / "c"))
    table.select(range(6)).save_to_disk(str(root))
    return root, 6, 0


def _two_step_task(dataset: dict) -> dict:
    """The flow tests' tiny-sd1 task on ``dataset``, two steps of batch 2."""
    document = json.loads(flow_task().model_dump_json(exclude_unset=True))
    document["dataset"] = dataset
    document["train_args"].update(num_train_steps=2, max_train_steps=2, batch_size=2,
                                  gradient_accumulation_steps=1)
    return document


def _loraflow_run(document: dict, prefect_api: str, tmp_path: Path) -> dict:
    """``loraflow run`` of ``document`` in a child process; its run summary."""
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(document))
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(task_file), "--output-dir", str(out),
         "--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "-q"],
        env=subprocess_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (summary_file,) = out.rglob("run_summary.json")
    return json.loads(summary_file.read_text())


LAYOUTS: dict[str, Callable] = {
    "kohya": _kohya,
    "metadata_csv": _metadata_csv,
    "parquet": _parquet,
    "save_to_disk": _save_to_disk,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_own_data_layout_trains_through_loraflow_run(
    layout: str, prefect_api: str, tmp_path: Path
) -> None:
    demo = build_demo_data(tmp_path / "demo")
    source, count, skipped = LAYOUTS[layout](demo, tmp_path / "source")
    document = _two_step_task({"name": str(source)})
    summary = _loraflow_run(document, prefect_api, tmp_path)
    assert summary["global_step"] == 2
    assert summary["dataset"]["count"] == count
    assert summary["dataset"]["skipped"] == skipped
    (manifest_file,) = (tmp_path / "data").glob("dataset-*/manifest.json")
    manifest = json.loads(manifest_file.read_text())
    records = [json.loads(line) for line in
               (manifest_file.parent / "records.jsonl").read_text().splitlines()]
    if layout == "kohya":
        assert manifest["skipped"][0]["reason"].endswith(".txt missing")
        assert sorted(r.get("repeats", 1) for r in records) == [1, 1, 1, 2, 2]


def test_webdataset_shards_on_s3_train_through_loraflow_run(
    prefect_api: str, s3, s3_prefix: str, tmp_path: Path
) -> None:
    """A brace pattern of shards on the real S3 test server, read by two data-loader
    workers (ranged reads from forked processes), buckets on: trains to the end."""
    client = s3.filesystem()
    for k in range(2):
        members = [m for i in range(k * 5, k * 5 + 5) for m in
                   sample(f"{i:06d}", image=png(48 + 16 * (i % 2), 48, (i * 20, 90, 30)),
                          caption=f"a shape number {i}")]
        client.pipe_file(f"{s3_prefix}/shards/{k:04d}.tar", shard_bytes(members))
    document = _two_step_task({"shards": [f"{s3_prefix}/shards/{{0000..0001}}.tar"]})
    document["dataloader_num_workers"] = 2
    document["train_args"]["buckets"] = {"step": 16}
    summary = _loraflow_run(document, prefect_api, tmp_path)
    assert summary["global_step"] == 2 and summary["dataset"]["count"] == 10
    assert not list((tmp_path / "data").rglob("*.png"))  # streamed: no image copied
