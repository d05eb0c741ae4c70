"""A run a person watches in the UI: progress while a segment trains, a loss / lr chart,
a readable name, and the command line's overrides in its summary.

Before: the progress artifact moved only when a segment finished, no chart existed, runs
had random names (``eager-panda``), and nothing recorded how a run differed from its
task file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from tests.support.flow import artifacts, flow_run_id, flow_task, run_finetune

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(300)

OVERRIDES = ["lora.rank=4", "train_args.seed=7"]  # what the task already says: same result


@pytest.fixture(scope="module")
def updates() -> Iterator[list[tuple[UUID, float, str]]]:
    """Every progress-artifact update sent during a segment (sent on to Prefect too), with
    the throttle off so that each step is seen."""
    import tasks.progress

    real = tasks.progress._prefect_update
    seen: list[tuple[UUID, float, str]] = []

    def update(artifact_id: UUID, progress: float, description: str) -> object:
        seen.append((artifact_id, progress, description))
        return real(artifact_id, progress, description)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks.progress, "_prefect_update", update)
        patch.setattr(tasks.progress, "UPDATE_EVERY_SECONDS", 0.0)
        yield seen


@pytest.fixture(scope="module")
def live_run(prefect_api: str, updates: list, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("live")
    state, summary = run_finetune(flow_task(), str(root / "quickstart"),
                                  cache_dir=str(root / "cache"), overrides=OVERRIDES)
    return {"root": root, "state": state, "summary": summary, "updates": list(updates)}


def _by_key(run: dict) -> dict[str, list]:
    found: dict[str, list] = {}
    for artifact in artifacts(flow_run_id(run["state"])):  # newest first
        found.setdefault(artifact.key, []).append(artifact)
    return found


def test_progress_moves_during_each_segment(live_run: dict) -> None:
    from flows.artifacts import run_key

    (progress,) = _by_key(live_run)[f"{run_key(str(live_run['root'] / 'quickstart'))}-progress"]
    sent = live_run["updates"]
    assert {artifact_id for artifact_id, _, _ in sent} == {progress.id}
    # steps 1, 3 and 5 end no segment (segments of 2 steps): only an in-segment update
    # shows them
    assert [p for _, p, _ in sent] == [16.7, 33.3, 50.0, 66.7, 83.3, 100.0]
    assert "loss" in sent[0][2] and "samples/s" in sent[0][2]
    assert float(progress.data) == 100.0


def test_a_loss_and_lr_chart_is_updated_per_segment(live_run: dict) -> None:
    from flows.artifacts import run_key

    curves = _by_key(live_run)[f"{run_key(str(live_run['root'] / 'quickstart'))}-curve"]
    assert len(curves) == 3  # one version per segment
    latest = curves[0].data
    assert latest.startswith("# Training curve: steps 1-6 of 6")
    assert "data:image/png;base64," in latest


def test_the_run_has_a_readable_name(live_run: dict) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        name = client.read_flow_run(flow_run_id(live_run["state"])).name
    assert re.fullmatch(r"quickstart-\d{4}-\d{2}-\d{2}-\d{4}", name), name


def test_the_overrides_are_in_the_run_summary(live_run: dict) -> None:
    assert live_run["summary"]["overrides"] == OVERRIDES
    published = Path(live_run["summary"]["lora"]["run_summary"])
    assert json.loads(published.read_text())["overrides"] == OVERRIDES


def test_a_segment_flow_run_moves_the_progress_of_the_run_that_sent_it(
    live_run: dict, updates: list, tmp_path: Path,
) -> None:
    """What a ``finetune-segment`` worker gets: the id, as a flow-run parameter."""
    from flows.finetune import finetune_segment
    from tasks.payloads import DatasetSummary, SegmentRequest

    artifact_id = live_run["updates"][0][0]  # the run's progress bar
    dataset = DatasetSummary.model_validate(
        {"address": "x", "count": 1, "content_hash": "h", "skipped": 0,
         "skipped_examples": [], "empty_captions": 0})
    request = SegmentRequest(task=flow_task(), index=0, output_dir=str(tmp_path / "run"),
                             checkpoint=None, dataset=dataset,
                             cache_dir=str(live_run["root"] / "cache"))
    before = len(updates)
    finetune_segment(request, "segment-0 steps 0-2", progress_artifact=str(artifact_id))
    assert [(a, p) for a, p, _ in updates[before:]] == [(artifact_id, 16.7), (artifact_id, 33.3)]
