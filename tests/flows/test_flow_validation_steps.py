"""Validation every N steps in the real flow: images and held-out loss at those steps in
``validation/step-N/`` and in the UI, rendered by tasks of their own after the segment
that committed the checkpoint, so the segments train exactly as without it.

6 steps in 2 segments of 3, an in-segment checkpoint every step, validation every 2: step
2 and 4 come from in-segment checkpoints, step 6 from the last segment's own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.engine import checkpoint_bytes
from tests.support.flow import artifacts, flow_run_id, flow_task, run_finetune, task_runs

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(600)

VALIDATED = [2, 4, 6]
BUDGET = 900.0  # a budget every segment gets (large: the steps must not depend on timing)


def validated_task() -> Any:
    return flow_task(**{"train_args.num_train_steps": 3, "train_args.checkpointing_steps": 1,
                        "validation.validation_steps": 2})


@pytest.fixture(scope="module")
def validated_run(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One flow run with validation_steps; records the options every segment ran with."""
    import tasks.segment

    real = tasks.segment.run_segment
    seen: list[dict] = []

    def recording(task: Any, output_dir: str, opts: Any = None) -> Any:
        seen.append({"validate": opts.validate, "budget": opts.budget_seconds,
                     "segment": Path(output_dir).name})
        return real(task, output_dir, dataclasses.replace(opts))

    root = tmp_path_factory.mktemp("validated")
    mp = pytest.MonkeyPatch()
    mp.setattr(tasks.segment, "run_segment", recording)
    try:
        state, summary = run_finetune(validated_task(), str(root / "run"),
                                      cache_dir=str(root / "cache"), budget_seconds=BUDGET)
    finally:
        mp.undo()
    return {"root": root, "state": state, "summary": summary, "segments_saw": seen}


def test_each_validated_step_has_images_and_loss_in_its_folder(validated_run: dict) -> None:
    run_dir = validated_run["root"] / "run"
    folders = sorted(p.name for p in (run_dir / "validation").glob("step-*"))
    assert folders == [f"step-{s}" for s in VALIDATED]
    for step in VALIDATED:
        folder = run_dir / "validation" / f"step-{step}"
        assert (folder / "00.png").read_bytes()[:4] == b"\x89PNG"
        loss = json.loads((folder / "loss.json").read_text())
        assert loss["global_step"] == step and loss["loss"] > 0
        assert loss["source"] == "training_subset"
        assert json.loads((folder / "prompts.json").read_text())["global_step"] == step
    rows = validated_run["summary"]["validation_steps"]
    assert [r["global_step"] for r in rows] == VALIDATED
    losses = [r["loss"]["raw"] for r in rows]
    assert len(set(losses)) == len(losses), "each step's weights give their own loss"


def test_ui_shows_the_image_grid_and_the_loss_table(validated_run: dict) -> None:
    from flows.artifacts import run_key

    key = run_key(str(validated_run["root"] / "run"))
    found = artifacts(flow_run_id(validated_run["state"]))
    grids = [a for a in found if a.key == f"{key}-validation-grid"]
    tables = [a for a in found if a.key == f"{key}-validation-loss"]
    assert grids and tables
    grid = max(grids, key=lambda a: a.created).data
    for step in VALIDATED:
        assert f"## Step {step}: held-out loss raw" in grid
    assert grid.count("data:image/png;base64,") == len(VALIDATED)  # one image per step
    data = max(tables, key=lambda a: a.created).data
    rows = json.loads(data) if isinstance(data, str) else data
    assert [r["step"] for r in rows] == VALIDATED
    run_dir = validated_run["root"] / "run"
    for row in rows:
        loss = json.loads((run_dir / "validation" / f"step-{row['step']}" / "loss.json")
                          .read_text())["loss"]
        assert row["loss (raw)"] == round(loss, 6)


def test_validation_runs_in_its_own_tasks_after_the_segment_committed(validated_run: dict) -> None:
    runs = {r.name: r for r in task_runs(flow_run_id(validated_run["state"]))}
    segment_of = {2: "segment-0 steps 0-3", 4: "segment-1 steps 3-6", 6: "segment-1 steps 3-6"}
    for step, segment in segment_of.items():
        validation = runs[f"validate-step {step}"]
        assert validation.state.is_completed()
        assert validation.start_time >= runs[segment].end_time


def test_segments_train_as_without_validation(validated_run: dict,
                                              reference_run: dict[str, bytes]) -> None:
    """No segment is asked to validate (its clock reserves nothing after its save) and the
    training is bit for bit the engine's own run of the same task without validation."""
    seen = validated_run["segments_saw"]
    assert [s["segment"] for s in seen] == ["0000", "0001"]
    assert all(s["validate"] is False and s["budget"] == BUDGET for s in seen)
    summary = validated_run["summary"]
    assert [(s["start_step"], s["global_step"]) for s in summary["segment_results"]] == \
        [(0, 3), (3, 6)]
    assert checkpoint_bytes(summary["checkpoint"]) == reference_run


def test_the_loss_is_the_same_when_recomputed_for_the_same_checkpoint(
    validated_run: dict, tmp_path: Path,
) -> None:
    from engine.data.prepared import load_dataset_for_task
    from engine.infer.step_validation import validate_step

    task = validated_task()
    run_dir = validated_run["root"] / "run"
    checkpoint = str(run_dir / "segments" / "0001" / "checkpoints" / "step-00000004")
    again = validate_step(task, checkpoint, str(tmp_path), load_dataset_for_task(task, None))
    recorded = json.loads((run_dir / "validation" / "step-4" / "loss.json").read_text())
    assert again.loss["raw"] == recorded["loss"]
    assert (tmp_path / "validation" / "step-4" / "00.png").read_bytes() == \
        (run_dir / "validation" / "step-4" / "00.png").read_bytes()
