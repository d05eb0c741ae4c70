"""A real ``prefect server start`` in a subprocess, for tests that need what only a
long-lived server does (deployments, workers, automations), as a pytest plugin:
``pytest_plugins = ["tests.support.prefect_server"]`` gives the ``prefect_server`` fixture.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support.flow import subprocess_env, wait_for

#: A ``finetune`` run in a child process that hands each segment to the workers of
#: ``finetune-segment/gpu``: ``python -c ORCHESTRATOR TASK_JSON RUN_NAME OUTPUT_DIR``.
ORCHESTRATOR = """
import json, sys
from engine.task.validation import validate_document
from flows.finetune import finetune

task = validate_document(json.loads(sys.argv[1]))
state = finetune.with_options(flow_run_name=sys.argv[2])(
    task=task, output_dir=sys.argv[3], segment_deployment="finetune-segment/gpu",
    return_state=True,
)
sys.exit(0 if state.is_completed() else 1)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group we started (server and its children), then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``prefect server start`` on a free loopback port; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = subprocess_env(PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed after the server stops
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: healthy(url), 120, "the Prefect server to answer /health", process)
        yield url
    finally:
        stop_group(process)
        log.close()
