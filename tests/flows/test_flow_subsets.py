"""The flow with two subsets, one bucketed with mixed shapes: it finishes, publishes
each subset by its public name, and shows a person every bucket and the images per epoch
(the run summary and the ``<run>-data`` table artifact), before any step is trained."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from engine.data.prepared import load_dataset_for_task
from engine.store.safetensors_io import read_metadata
from engine.task.validation import validate_document
from tests.support.datasets import image_folder, png
from tests.support.engine import BASE_TASK
from tests.support.flow import artifacts, flow_run_id, run_finetune

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(300)

MIXED = [(64, 64), (48, 96), (96, 48), (32, 128)]  # 1:1, 1:2, 2:1, a 1:4 outlier


def _folder(root: Path, name: str, sizes: list[tuple[int, int]]) -> str:
    items = [(f"{i}.png", png(w, h, (40 * i, 120, 200)), f"{name} shape {i}")
             for i, (w, h) in enumerate(sizes)]
    return str(image_folder(root / name, items))


@pytest.fixture(scope="module")
def subsets_run(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("subsets")
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    doc["datasets"] = [
        {"name": _folder(root, "squares", [(64, 64)] * 3)},
        {"name": _folder(root, "mixed", MIXED), "repeats": 2, "buckets": {"step": 16}},
    ]
    doc["train_args"].update(batch_size=2, gradient_accumulation_steps=1,
                             num_train_steps=2, max_train_steps=4)
    task = validate_document(doc)
    state, summary = run_finetune(task, str(root / "run"), cache_dir=str(root / "cache"),
                                  data_dir=str(root / "data"))
    data = load_dataset_for_task(task, str(root / "data"))
    return {"root": root, "state": state, "summary": summary, "data": data}


def test_two_subsets_train_to_the_end_and_publish(subsets_run: dict) -> None:
    summary, root = subsets_run["summary"], subsets_run["root"]
    assert summary["global_step"] == summary["total_steps"] == 4
    assert summary["segments"] == 2
    lora = Path(summary["lora"]["lora_dir"])
    task = json.loads((lora / "task.json").read_text())
    assert [d["name"] for d in task["datasets"]] == ["squares", "mixed"]
    assert validate_document(task).datasets[1].repeats == 2
    kohya = read_metadata(Path(summary["lora"]["kohya"]).read_bytes())
    assert json.loads(kohya["ss_dataset_dirs"]) == {
        "squares": {"n_repeats": 1, "img_count": 3}, "mixed": {"n_repeats": 2, "img_count": 4}}
    assert kohya["ss_num_train_images"] == "11"
    for name in ("task.json", "README.md"):
        assert str(root) not in (lora / name).read_text(), name
    published = json.loads((lora / "run_summary.json").read_text())
    assert str(root) not in json.dumps(published["dataset"])  # subsets by public name
    assert "## Training data" in (lora / "README.md").read_text()


def test_the_run_summary_counts_every_image_of_an_epoch(subsets_run: dict) -> None:
    epoch = subsets_run["summary"]["dataset"]["epoch"]
    data = subsets_run["data"]
    assert epoch["images"] == 7
    assert epoch["images_per_epoch"] == 3 + 2 * 4  # no image left out of an underfull bucket
    assert [(s["name"], s["uses"]) for s in epoch["subsets"]] == [("squares", 3), ("mixed", 8)]
    assert {b["bucket"] for b in epoch["buckets"]} == {str(data.bucket(i))
                                                       for i in range(len(data))}
    assert len(epoch["buckets"]) >= 3
    published = json.loads((Path(subsets_run["summary"]["lora"]["lora_dir"])
                            / "run_summary.json").read_text())
    assert published["dataset"]["epoch"] == epoch


def test_the_data_artifact_lists_each_bucket_and_the_images_per_epoch(subsets_run: dict) -> None:
    from flows.artifacts import run_key

    key = f"{run_key(str(subsets_run['root'] / 'run'))}-data"
    (table,) = [a for a in artifacts(flow_run_id(subsets_run["state"])) if a.key == key]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    data = subsets_run["data"]
    uses: dict[str, int] = {}
    for i in range(len(data)):
        uses[str(data.bucket(i))] = uses.get(str(data.bucket(i)), 0) + data.repeats(i)
    assert {r["bucket"]: r["uses per epoch"] for r in rows[:-1]} == uses
    assert rows[-1] == {"bucket": "all", "images": 7, "uses per epoch": 11,
                        "batches": sum(-(-u // 2) for u in uses.values())}
    assert "11 uses" in table.description and "mixed: 4 images x2 = 8" in table.description
