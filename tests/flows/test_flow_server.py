"""The pipeline against a real ``prefect server start``, with segments on served workers.

A Prefect server runs in a subprocess (its own temp PREFECT_HOME and SQLite database).
Two ``loraflow serve-segments`` processes play two GPU machines serving the
``finetune-segment/gpu`` deployment. A ``finetune`` run in a third process hands each
segment to whichever worker is free (``segment_deployment``). Afterwards Prefect's
client must show what a person would look at in the UI: the completed run, its task
runs named ``segment-N steps a-b``, one ``finetune-segment`` flow run per segment, and
the artifacts. The LoRA must equal the engine's single-process run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.flow import (
    artifacts,
    assert_same_lora,
    flow_task,
    lora_bytes,
    python_command,
    subprocess_env,
    task_runs,
    wait_for,
)
from tests.support.prefect_server import ORCHESTRATOR, stop_group

pytest_plugins = ["tests.support.flow_fixtures", "tests.support.prefect_server"]

pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def segment_workers(prefect_server: str, tmp_path: Path) -> Iterator[list[subprocess.Popen]]:
    """Two ``loraflow serve-segments`` processes serving ``finetune-segment/gpu``."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = subprocess_env(PREFECT_API_URL=prefect_server, PREFECT_RUNNER_POLL_FREQUENCY="1")
    workers = []
    for name in ("a", "b"):
        log = tmp_path / f"worker-{name}.log"
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve-segments", "--name", "gpu"],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def deployment_ready() -> bool:
        with temporary_settings({PREFECT_API_URL: prefect_server}), \
                get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name("finetune-segment/gpu")
            except Exception:  # noqa: BLE001 - not registered yet
                return False
            return True

    try:
        wait_for(deployment_ready, 120, "the segment workers to serve", workers[0])
        yield workers
    finally:
        for worker in workers:
            stop_group(worker)




def test_segments_run_on_served_workers(
    prefect_server: str, segment_workers: list, reference_run: dict[str, bytes],
    tmp_path: Path,
) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = tmp_path / "run"
    proc = subprocess.run(
        [*python_command(ORCHESTRATOR), flow_task().model_dump_json(), "distributed", str(out)],
        env=subprocess_env(PREFECT_API_URL=prefect_server), capture_output=True, text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_lora(lora_bytes(str(out / "segments" / "0002" / "checkpoint")),
                     reference_run["lora"])
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["distributed"])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=5,
            )
            segment_runs = [
                r for r in client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                                                 limit=50)
                if r.flow_id != run.flow_id
            ]
        assert run.state.is_completed()
        names = {r.name: r for r in task_runs(run.id)}
        for expected in ("segment-0 steps 0-2", "segment-1 steps 2-4", "segment-2 steps 4-6"):
            assert names[expected].state.is_completed(), expected
        # one finetune-segment flow run per segment, each a subflow of the finetune run
        # (run_deployment links it through a task run of its own in the parent run)
        assert len(segment_runs) == 3 and all(r.state.is_completed() for r in segment_runs)
        parent_task_runs = {t.id for t in task_runs(run.id)}
        assert {r.parent_task_run_id for r in segment_runs} <= parent_task_runs
        kinds = {a.type for a in artifacts(run.id)}
        assert {"progress", "table", "markdown"} <= kinds, kinds
