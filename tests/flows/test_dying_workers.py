"""A GPU machine dies mid-segment: its segment is dispatched again and the LoRA is the same.

Everything is real and as infra/ documents it: ``prefect server start``, the process work
pool ``loraflow-gpu``, ``prefect deploy`` of ``finetune-segment/gpu`` from
infra/prefect.yaml, ``loraflow detect-crashes`` (the heartbeat automation), and two
``prefect worker start`` processes playing two GPU machines. A ``finetune`` run hands its
segments to them. When segment 1 starts, the machine training it dies: its worker and
the flow-run process are killed with SIGKILL, so nothing is reported. The server's
automation marks the silent run Crashed, the ``dispatch-segment`` task retries, the other
worker resumes from the same input checkpoint, and the run ends with the LoRA of an
undisturbed run, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.segment import STARTED_FILE
from tests.support.flow import (
    REPO_ROOT,
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

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

POOL = "loraflow-gpu"
HEARTBEAT_SECONDS = 30  # Prefect's minimum
SILENCE_SECONDS = 75  # a little over two missed heartbeats: short, for the test



def _run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"{command}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


@pytest.fixture
def gpu_workers(prefect_server: str, tmp_path: Path) -> Iterator[dict[int, subprocess.Popen]]:
    """The pool, the deployment, the automation and two process workers, by their pid."""
    env = subprocess_env(
        PREFECT_API_URL=prefect_server, LORAFLOW_PROJECT_DIR=str(REPO_ROOT),
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_SECONDS),
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    _run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process",
          "--overwrite"], env)
    _run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
          "infra/prefect.yaml", "--name", "finetune-segment/gpu"], env)
    _run([sys.executable, "-m", "flows.cli", "detect-crashes",
          "--after-silence", str(SILENCE_SECONDS)], env)
    workers = {}
    for name in ("machine-a", "machine-b"):
        log = tmp_path / f"{name}.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
             "--name", name, "--limit", "1"],
            env=env, cwd=REPO_ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers[worker.pid] = worker
    try:
        yield workers
    finally:
        for worker in workers.values():
            stop_group(worker)


def _ancestors(pid: int) -> Iterator[int]:
    """The parent, grandparent... of a process (from /proc)."""
    while pid > 1:
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        yield pid


def _kill_machine(flow_run_pid: int, workers: dict[int, subprocess.Popen]) -> int:
    """SIGKILL the worker that started ``flow_run_pid`` (its whole group) and the flow-run
    process (a session of its own): a machine gone without a word. Returns the worker."""
    (worker_pid,) = [p for p in _ancestors(flow_run_pid) if p in workers]
    os.killpg(worker_pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(flow_run_pid, signal.SIGKILL)
    workers[worker_pid].wait(timeout=30)
    return worker_pid


def test_a_dead_worker_s_segment_is_dispatched_again_and_the_lora_is_the_same(
    prefect_server: str, gpu_workers: dict[int, subprocess.Popen],
    reference_run: dict[str, bytes], tmp_path: Path,
) -> None:
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = tmp_path / "run"
    orchestrator = subprocess.Popen(
        [*python_command(ORCHESTRATOR), flow_task().model_dump_json(), "machine-dies",
         str(out)],
        env=subprocess_env(PREFECT_API_URL=prefect_server), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        started = out / "segments" / "0001" / STARTED_FILE
        wait_for(started.exists, 300, "segment 1 to start on a worker", orchestrator)
        first = json.loads(started.read_text())
        dead = _kill_machine(first["pid"], gpu_workers)
        assert not (out / "segments" / "0001" / "checkpoint" / "manifest.json").exists(), (
            "segment 1 committed before its machine died: the test proved nothing")
        _, stderr = orchestrator.communicate(timeout=480)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
    assert orchestrator.returncode == 0, stderr[-4000:]

    assert_same_lora(lora_bytes(str(out / "segments" / "0002" / "checkpoint")),
                     reference_run["lora"])
    second = json.loads(started.read_text())
    assert second["flow_run_id"] != first["flow_run_id"]  # the segment ran again

    with temporary_settings({PREFECT_API_URL: prefect_server}), \
            get_client(sync_client=True) as client:
        runs = {str(r.id): r for r in client.read_flow_runs(
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50)}
        killed, retried = runs[first["flow_run_id"]], runs[second["flow_run_id"]]
        assert killed.state.name == "Crashed", killed.state
        assert "no heartbeat" in (killed.state.message or "")
        assert retried.state.is_completed(), retried.state
        # the dead worker was reaped before the retry: only the live machine could take it
        assert gpu_workers[dead].returncode == -signal.SIGKILL
        assert killed.infrastructure_pid != retried.infrastructure_pid
        (parent,) = [r for r in runs.values() if r.name == "machine-dies"]
        assert parent.state.is_completed()
        # one dispatch-segment task run for segment 1: failed once (the crash), retried
        dispatch = [r for r in task_runs(parent.id) if r.name == "segment-1 steps 2-4"]
    assert [r.state.name for r in dispatch] == ["Completed"] and dispatch[0].run_count == 2
