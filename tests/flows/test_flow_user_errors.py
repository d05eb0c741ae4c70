"""A new user's first ``loraflow run``: it starts on a slow machine, and a mistake in the
input is said once, plainly.

1. Prefect's temporary API server gets time for a first start (database migrations) on a
   busy 2-core machine: ``loraflow run`` raises Prefect's 20 s start-up timeout, unless the
   user set one.
2. Bad input found inside the flow (a dataset path that does not exist) is not retried by
   Prefect and reaches the console as one ``error:`` line with exit code 2, no traceback;
   the flow run's state message in the UI says the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.flow import flow_task, python_command, subprocess_env, task_runs

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(300)

TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"

#: What ``loraflow run`` does before Prefect is imported; then the timeout Prefect uses.
STARTUP_TIMEOUT_IN_EFFECT = """
import sys
from flows.run import prepare_prefect_environment

assert "prefect" not in sys.modules
prepare_prefect_environment()
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

print(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
"""


def _startup_timeout(**env: str) -> int:
    environment = subprocess_env(**env)
    if not env:
        environment.pop(TIMEOUT_SETTING, None)
    done = subprocess.run(python_command(STARTUP_TIMEOUT_IN_EFFECT), env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_run_gives_the_temporary_server_time_for_a_first_start() -> None:
    assert _startup_timeout() >= 120  # Prefect's default, 20 s, failed a first start here
    assert _startup_timeout(**{TIMEOUT_SETTING: "7"}) == 7  # the user's own value wins


def _flow_run_into(output_dir: str) -> Any:
    """The newest flow run whose ``output_dir`` parameter is ``output_dir``."""
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)
    (run,) = [r for r in runs if r.parameters.get("output_dir") == output_dir][:1]
    return run


def test_missing_dataset_under_run_is_one_clean_error_and_not_retried(
    prefect_api: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dataset"
    task_file = tmp_path / "task.json"
    document = json.loads(flow_task().model_dump_json(exclude_unset=True))
    document["dataset"] = {"name": str(missing)}
    task_file.write_text(json.dumps(document))
    out = tmp_path / "run"

    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(task_file), "--output-dir", str(out)],
        env=subprocess_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True,
        timeout=240,
    )
    assert done.returncode == 2, done.stderr[-4000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0], done.stderr[-4000:]
    assert "Retry" not in done.stderr, done.stderr[-4000:]

    run = _flow_run_into(str(out))
    assert run.state.is_failed()
    message = errors[0].removeprefix("error: ")
    assert message in run.state.message, run.state.message
    runs = [r for r in task_runs(run.id) if r.name.startswith("prepare-dataset")]
    assert [(r.run_count, r.state.name) for r in runs] == [(1, "Failed")]
    assert [r.name for r in task_runs(run.id)] == [runs[0].name]  # nothing ran after it
