"""Failures and retries: what an operator sees when a segment or a whole run goes down.

1. A segment that raises mid-way is retried by Prefect from its *input* checkpoint: the
   steps of the failed attempt are thrown away, not kept or counted twice, and the final
   LoRA is bit for bit the undisturbed one.
2. A flow run whose process is killed (SIGKILL: no chance to report) is retried as the
   same flow run: the steps that completed come back from Prefect's result cache, the
   segment that committed is not trained again, and the final LoRA is the same again.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.segment import STARTED_FILE
from tests.support.engine import checkpoint_bytes
from tests.support.flow import (
    FAULT_MARKER,
    flow_run_id,
    flow_task,
    python_command,
    run_finetune,
    subprocess_env,
    task_runs,
    wait_for,
)

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(300)


def test_failed_segment_is_retried_from_its_input_checkpoint(
    prefect_api: str, reference_run: dict[str, bytes], tmp_path: Path,
    fail_segment_once: Callable[[int, int], None],
) -> None:
    fail_segment_once(1, 3)  # segment 1 (steps 2-4) fails after step 3, once
    state, summary = run_finetune(flow_task(), str(tmp_path / "run"))

    segment_dir = tmp_path / "run" / "segments" / "0001"
    assert (segment_dir / FAULT_MARKER).read_text().startswith("failed after step 3")
    (retried,) = [r for r in task_runs(flow_run_id(state)) if r.name == "segment-1 steps 2-4"]
    assert retried.run_count == 2 and retried.state.is_completed()

    second = summary["segment_results"][1]
    assert (second["start_step"], second["global_step"], second["stopped_by"]) == (2, 4, "steps")
    metrics = segment_dir / "metrics" / "metrics.jsonl"
    assert [json.loads(line)["global_step"] for line in metrics.open()] == [3, 4]
    assert checkpoint_bytes(summary["checkpoint"]) == reference_run


#: The flow in its own process. Segment 1 holds after its first step (it writes
#: HOLDING_FILE, then waits for a kill that never lets it commit), so the test kills it
#: mid-segment whatever the machine's speed.
FLOW_IN_SUBPROCESS = """
import dataclasses, json, sys, threading
from pathlib import Path
import tasks.segment
from engine.task.validation import validate_document
from flows.finetune import finetune

real_run_segment = tasks.segment.run_segment

def run_segment(task, output_dir, opts):
    if Path(output_dir).name != "0001":
        return real_run_segment(task, output_dir, opts)
    production = opts.on_step

    def on_step(report):
        production(report)
        (Path(output_dir) / "holding").write_text(str(report.global_step))
        threading.Event().wait()  # until SIGKILL

    return real_run_segment(task, output_dir, dataclasses.replace(opts, on_step=on_step))

tasks.segment.run_segment = run_segment
task = validate_document(json.loads(sys.argv[1]))
finetune.with_options(flow_run_name=sys.argv[2])(task=task, output_dir=sys.argv[3])
"""
HOLDING_FILE = "holding"


def _segment_running(flow_run_name: str, segment: str) -> bool:
    """The API records ``segment``'s task run of the named flow run as Running (the state
    reaches the server asynchronously, after the segment's own first files)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))
    return any(r.name == segment and r.state is not None and r.state.name == "Running"
               for run in runs for r in task_runs(run.id))


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_killed_flow_run_is_retried_without_redoing_committed_work(
    prefect_api: str, reference_run: dict[str, bytes], tmp_path: Path,
) -> None:
    from flows.run import retry_flow_run

    out = tmp_path / "run"
    name = f"killed-{tmp_path.name}"
    task_json = flow_task().model_dump_json()
    process = subprocess.Popen(
        [*python_command(FLOW_IN_SUBPROCESS), task_json, name, str(out)],
        env=subprocess_env(PREFECT_API_URL=prefect_api),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        # segment 1 has started (segment 0 committed before it): kill the run mid-segment
        wait_for(lambda: (out / "segments" / "0001" / STARTED_FILE).exists(), 180,
                 "segment 1 to start", process)
    finally:
        process.kill()  # SIGKILL: the run cannot report anything
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == -9, stderr.decode(errors="replace")[-2000:]
    assert not (out / "segments" / "0001" / "checkpoint" / "manifest.json").exists()
    committed = _files(out / "segments" / "0000" / "checkpoint")

    # the API still says Running (nobody reported the crash): the operator forces the retry
    with pytest.raises(ValueError, match="--force"):
        retry_flow_run(name)
    state = retry_flow_run(name, force=True)
    assert state.is_completed(), state.message
    summary = state.result()

    assert checkpoint_bytes(summary["checkpoint"]) == reference_run
    assert _files(out / "segments" / "0000" / "checkpoint") == committed  # not re-trained
    runs = task_runs(flow_run_id(state))
    segment0 = [r.state.name for r in runs if r.name == "segment-0 steps 0-2"]
    assert segment0 == ["Completed", "Cached"], segment0  # first attempt, then the retry
    for step in ("prepare-dataset", "build-cache"):
        assert [r.state.name for r in runs if r.name.startswith(step)] == ["Completed", "Cached"]
    segment1 = [r.state.name for r in runs if r.name == "segment-1 steps 2-4"]
    assert segment1 == ["Running", "Completed"], segment1  # the killed attempt stays Running
    assert os.path.exists(summary["lora"]["diffusers"])
