"""The finetune flow end to end on local storage, against a real Prefect API server.

The tiny task (6 steps in 3 segments of 2) must finish, publish its LoRA, leave what a
person looks for in the UI (named task runs, progress / table / markdown artifacts),
and train exactly what the engine trains in one process, bit for bit. A second run on
the same data must find the cache instead of encoding again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.engine import checkpoint_bytes
from tests.support.flow import (
    artifacts,
    flow_run_id,
    flow_task,
    lora_bytes,
    run_finetune,
    task_runs,
)

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def first_run(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One flow run on a fresh cache folder (so this run is the one that builds it)."""
    root = tmp_path_factory.mktemp("flow")
    state, summary = run_finetune(
        flow_task(), str(root / "run"), cache_dir=str(root / "cache"),
    )
    return {"root": root, "state": state, "summary": summary}


def test_flow_finishes_and_publishes(first_run: dict) -> None:
    summary = first_run["summary"]
    run_dir = first_run["root"] / "run"
    assert summary["global_step"] == summary["total_steps"] == 6
    assert summary["segments"] == 3
    assert summary["checkpoint"] == str(run_dir / "segments" / "0002" / "checkpoint")
    assert [s["start_step"] for s in summary["segment_results"]] == [0, 2, 4]

    lora = Path(summary["lora"]["lora_dir"])
    assert lora == run_dir / "lora"
    for name in ("pytorch_lora_weights.safetensors", "README.md", "task.json",
                 "run_summary.json", "metrics.jsonl"):
        assert (lora / name).is_file(), name
    assert Path(summary["lora"]["kohya"]).is_file()
    assert [Path(p).name for p in summary["validation"]] == ["00.png"]
    assert (run_dir / "validation" / "00.png").read_bytes()[:4] == b"\x89PNG"

    # the merged metrics hold every step once, in order
    steps = [json.loads(line)["global_step"] for line in (lora / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]
    published = json.loads((lora / "run_summary.json").read_text())
    assert published["global_step"] == 6 and published["run_name"] == "run"


def test_flow_lora_equals_single_process_engine_run(
    first_run: dict, reference_run: dict[str, bytes]
) -> None:
    final = first_run["summary"]["checkpoint"]
    assert checkpoint_bytes(final) == reference_run  # LoRA, optimizer moments, state
    assert lora_bytes(final) == reference_run["lora"]


def test_task_runs_are_named_by_segment_and_steps(first_run: dict) -> None:
    runs = task_runs(flow_run_id(first_run["state"]))
    names = [r.name for r in runs]
    for expected in ("segment-0 steps 0-2", "segment-1 steps 2-4", "segment-2 steps 4-6",
                     "validate step 6", "publish step 6"):
        assert expected in names, names
    assert any(n.startswith("prepare-dataset") for n in names)
    assert any(n.startswith("build-cache") for n in names)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs]


def test_artifacts_show_progress_metrics_and_result(first_run: dict) -> None:
    found = artifacts(flow_run_id(first_run["state"]))
    by_type: dict[str, list] = {}
    for artifact in found:
        by_type.setdefault(artifact.type, []).append(artifact)
    assert set(by_type) >= {"progress", "table", "markdown"}, set(by_type)

    from flows.artifacts import run_key

    key = run_key(str(first_run["root"] / "run"))  # the folder's name and a hash of its path
    assert key.startswith("run-") and len(key) == len("run-") + 8
    (progress,) = by_type["progress"]  # one artifact, updated in place
    assert progress.key == f"{key}-progress"
    assert float(progress.data) == 100.0

    latest_table = max(by_type["table"], key=lambda a: a.created)
    data = latest_table.data
    rows = json.loads(data) if isinstance(data, str) else data
    assert [r["segment"] for r in rows] == [0, 1, 2]
    assert [r["steps"] for r in rows] == ["0-2", "2-4", "4-6"]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in rows)
    assert all(r["samples/s"] > 0 for r in rows)

    (markdown,) = [a for a in by_type["markdown"] if a.key == f"{key}-result"]
    assert str(first_run["root"] / "run" / "lora") in markdown.data
    assert "data:image/png;base64," in markdown.data  # the image itself, inline


def test_second_run_finds_the_cache_and_the_segments(first_run: dict) -> None:
    """Same data, model and cache folder: nothing is encoded or trained again."""
    assert first_run["summary"]["cache"]["built_now"] is True
    root = first_run["root"]
    _, again = run_finetune(flow_task(), str(root / "run"), cache_dir=str(root / "cache"))
    assert again["cache"]["built_now"] is False
    assert again["cache"]["address"] == first_run["summary"]["cache"]["address"]
    assert [s["stopped_by"] for s in again["segment_results"]] == ["already_done"] * 3
    assert lora_bytes(again["checkpoint"]) == lora_bytes(first_run["summary"]["checkpoint"])


def test_engine_logs_reach_the_task_run(first_run: dict) -> None:
    """The engine's "committed ..." line is stored with the segment's task run."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs are sent in batches; wait for this process's
    runs = {r.name: r for r in task_runs(flow_run_id(first_run["state"]))}
    segment = runs["segment-1 steps 2-4"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[segment.id])),
            sort=LogSort.TIMESTAMP_ASC, limit=200, offset=0,  # None is refused (422)
        )
    messages = [log.message for log in logs]
    committed = [m for m in messages if "[engine.train.saver] committed" in m]
    assert any("at step 4" in m for m in committed), messages


def test_bad_task_is_refused_before_any_work(prefect_api: str, tmp_path: Path) -> None:
    """Rules between fields (here: segment longer than the training) fail the run at once."""
    from flows.finetune import finetune

    task = flow_task(**{"train_args.num_train_steps": 2})
    task.train_args.num_train_steps = 9  # validate_assignment only checks the field itself
    state = finetune(task=task, output_dir=str(tmp_path / "run"), return_state=True)
    assert state.is_failed()
    assert "num_train_steps" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "run").exists()


def test_flow_parameters_are_the_task_model() -> None:
    """A run from the UI or API sends JSON: Prefect turns it into the pydantic model,
    refusing unknown keys (``extra="forbid"``), and the form schema is the model's."""
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from engine.task.definition import TaskDefinition
    from flows.finetune import finetune

    document = flow_task().model_dump(mode="json")
    parameters = finetune.validate_parameters({"task": document, "output_dir": "runs/x"})
    assert isinstance(parameters["task"], TaskDefinition)
    with pytest.raises(ParameterTypeError, match="typo"):
        finetune.validate_parameters({"task": {**document, "typo": 1}, "output_dir": "runs/x"})
    schema = parameter_schema(finetune).model_dump()
    assert schema["properties"]["task"]["$ref"] == "#/definitions/TaskDefinition"
    assert schema["definitions"]["TaskDefinition"]["additionalProperties"] is False


def test_flow_trains_an_sdxl_task_with_text_encoder_lora_end_to_end(
    prefect_api: str, tmp_path: Path
) -> None:
    from tests.support.engine import run_chain

    task = flow_task(**{"model.name": "loraflow/tiny-sdxl",
                        "lora.text_encoder": {"rank": 2}})
    state, summary = run_finetune(task, str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    assert summary["global_step"] == summary["total_steps"] and summary["segments"] >= 2
    kohya = Path(summary["lora"]["kohya"])
    from safetensors.torch import load_file

    prefixes = {k.split("_")[1] for k in load_file(kohya) if k.startswith("lora_te")}
    assert prefixes == {"te1", "te2"}
    reference = run_chain(task.model_copy(), tmp_path / "engine", validate=False)
    assert checkpoint_bytes(summary["checkpoint"]) == checkpoint_bytes(reference[-1].checkpoint)


def test_segment_flow_takes_one_typed_request() -> None:
    """What ``dispatch-segment`` sends a worker (JSON) becomes the same typed request the
    in-process segment task gets; a key the model does not know is refused."""
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune_segment
    from tasks.payloads import DatasetSummary, SegmentRequest

    dataset = DatasetSummary(address="data/x", count=10, content_hash="abc", skipped=0,
                             skipped_examples=[], empty_captions=0)
    request = SegmentRequest(task=flow_task(), index=1, output_dir="runs/x",
                             checkpoint="runs/x/segments/0000/checkpoint", dataset=dataset)
    sent = {"request": request.model_dump(mode="json"), "name": "segment-1 steps 2-4"}
    parameters = finetune_segment.validate_parameters(sent)
    assert parameters["request"] == request
    with pytest.raises(ParameterTypeError, match="typo"):
        finetune_segment.validate_parameters(
            {"request": {**sent["request"], "typo": 1}, "name": "segment"}
        )
    schema = parameter_schema(finetune_segment).model_dump()
    assert schema["properties"]["request"]["$ref"] == "#/definitions/SegmentRequest"
    assert schema["definitions"]["SegmentRequest"]["additionalProperties"] is False
