"""Helpers shared by the flow tests: the tiny task, readers for what the UI shows (task
runs, artifacts, logs) through Prefect's client, and subprocess plumbing. The fixtures
live in ``tests/support/flow_fixtures.py`` (a plugin, so pytest can rewrite its asserts).

Every flow test runs the real flow, real tasks and real training on the tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from engine.lora.weights import LORA_FILE
from engine.store import storage
from engine.task.definition import TaskDefinition
from tests.support.engine import make_task

REPO_ROOT = Path(__file__).resolve().parents[2]

#: 6 steps in 3 segments of 2, 64 px, one validation image of 2 inference steps.
FLOW_TASK_CHANGES: dict[str, Any] = {
    "train_args.num_train_steps": 2,
    "train_args.max_train_steps": 6,
}


def flow_task(**changes: Any) -> TaskDefinition:
    return make_task(**{**FLOW_TASK_CHANGES, **changes})


def lora_bytes(checkpoint_url: str) -> bytes:
    """The LoRA file of a checkpoint on any storage (local or s3://)."""
    return storage.read_bytes(storage.join(checkpoint_url, LORA_FILE))


def run_finetune(task: TaskDefinition, output_dir: str, **parameters: Any) -> tuple[Any, dict]:
    """Run the flow in this process; return (final state, summary) and insist on success."""
    from flows.finetune import finetune

    state = finetune(task=task, output_dir=output_dir, return_state=True, **parameters)
    assert state.is_completed(), f"flow ended {state.name}: {state.message}"
    return state, state.result()


def flow_run_id(state: Any) -> UUID:
    return state.state_details.flow_run_id


def task_runs(run_id: UUID) -> list[Any]:
    """Task runs of a flow run, oldest first (limit and sort explicit; see flows/run.py)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )


def artifacts(run_id: UUID) -> list[Any]:
    """Artifacts created in a flow run (all versions), newest first.

    A raw request: with this server, ``read_artifacts`` of the 3.8.8 client (sync and
    async) sends ``null`` for the filters it was not given, which the server refuses
    (422), and empty flow/task run filters drop artifacts made by the flow itself.
    """
    from prefect import get_client
    from prefect.client.schemas.objects import Artifact

    body = {
        "artifacts": {"flow_run_id": {"any_": [str(run_id)]}},
        "sort": "CREATED_DESC",
        "limit": 200,
        "offset": 0,
    }
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter", json=body)
    return Artifact.model_validate_list(response.json())


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment (LORAFLOW_HOME, PREFECT_HOME, offline flags, AWS_*) with
    the repository importable, for child processes that play other machines or workers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.update(extra)
    return env


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
             process: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until true; fail after ``timeout_s`` or if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited ({process.returncode}) before {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def assert_same_lora(got: bytes, expected: bytes) -> None:
    """Bit-for-bit equality of two LoRA files, up to one known engine issue.

    Every tensor and every metadata entry must be byte-identical, except the order of
    ``target_modules`` inside ``lora_adapter_metadata``: PEFT keeps target modules in a
    ``set``, so two *processes* (different string hash seeds) list them in different
    orders. Within one process the files are identical, and there this compares bytes.
    """
    if got == expected:
        return
    from safetensors.torch import load as load_tensors

    from engine.store.safetensors_io import read_metadata

    got_tensors, expected_tensors = load_tensors(got), load_tensors(expected)
    assert got_tensors.keys() == expected_tensors.keys()
    for key, tensor in expected_tensors.items():
        assert got_tensors[key].dtype == tensor.dtype and got_tensors[key].equal(tensor), key

    def normalized(data: bytes) -> dict:
        meta = dict(read_metadata(data))
        adapter = json.loads(meta.pop("lora_adapter_metadata", "{}"))
        for key, value in adapter.items():
            if key.endswith("target_modules") and isinstance(value, list):
                adapter[key] = sorted(value)
        return {**meta, "lora_adapter_metadata": adapter}

    assert normalized(got) == normalized(expected)


#: Written by the :func:`~tests.support.flow_fixtures.fail_segment_once` fault when it fires.
FAULT_MARKER = ".fault-injected"


class InjectedFault(RuntimeError):
    """Raised by the test-only fault; a retry of the segment does not raise again."""
