"""The flow with DreamBooth prior preservation: the class-images step generates the class
images once (a re-run of the flow generates nothing, as its summary shows), and the
class subset trains, is counted and is published like any subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.data.class_subset import CLASS_SUBSET_NAME
from tests.support.flow import artifacts, flow_run_id, flow_task, run_finetune, task_runs

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dreambooth_runs(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dreambooth")
    task = flow_task(**{
        "train_args.max_train_steps": 4,
        "dreambooth": {"class_prompt": "a shape", "num_class_images": 3,
                       "prior_loss_weight": 0.5, "num_inference_steps": 2,
                       "batch_size": 2, "resolution": 32},
    })
    where = {"cache_dir": str(root / "cache"), "data_dir": str(root / "data")}
    first = run_finetune(task, str(root / "run"), **where)
    second = run_finetune(task, str(root / "run"), **where)  # a new run, same output
    return {"root": root, "first": first, "second": second}


def test_the_class_images_are_generated_once(dreambooth_runs: dict) -> None:
    _, first = dreambooth_runs["first"]
    _, second = dreambooth_runs["second"]
    assert first["dataset"]["class_images"] == {
        "count": 3, "from_folder": 0, "generated": 3, "reused": 0}
    assert second["dataset"]["class_images"] == {
        "count": 3, "from_folder": 0, "generated": 0, "reused": 3}
    pngs = list((dreambooth_runs["root"] / "data" / "class-images").glob("*/*.png"))
    assert len(pngs) == 3
    assert second["global_step"] == first["global_step"] == 4


def test_the_class_subset_trains_and_is_published(dreambooth_runs: dict) -> None:
    _, summary = dreambooth_runs["first"]
    subsets = summary["dataset"]["epoch"]["subsets"]
    assert subsets[-1]["name"] == CLASS_SUBSET_NAME
    assert (subsets[-1]["images"], subsets[-1]["loss_weight"]) == (3, 0.5)
    assert summary["dataset"]["count"] == subsets[0]["images"] + 3
    published = json.loads((Path(summary["lora"]["lora_dir"]) / "run_summary.json").read_text())
    assert published["dataset"]["class_images"]["count"] == 3
    assert str(dreambooth_runs["root"]) not in json.dumps(published["dataset"])


def test_the_class_images_step_and_its_artifact_show_in_the_ui(dreambooth_runs: dict) -> None:
    for key, generated in (("first", 3), ("second", 0)):
        run_id = flow_run_id(dreambooth_runs[key][0])
        assert "class-images" in [r.name.rsplit("-", 1)[0] for r in task_runs(run_id)]
        notes = [a.data for a in artifacts(run_id) if a.description
                 and a.description.startswith("DreamBooth class images")]
        assert len(notes) == 1 and f"{generated} generated now" in notes[0]
