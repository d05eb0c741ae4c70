"""Fixtures of the flow tests, as a plugin: ``pytest_plugins = ["tests.support.flow_fixtures"]``.

* ``prefect_api`` (session): a real Prefect API server for the whole session, from
  ``prefect_test_harness`` (a subprocess server on a temporary SQLite database);
  ``PREFECT_HOME`` is already a temp folder (conftest). Its URL is returned, so tests can
  point subprocesses at the same server.
* ``reference_run`` (session): the engine's own single-process chain of segments for
  :func:`tests.support.flow.flow_task`, the bit-for-bit yardstick of every flow test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.engine import checkpoint_bytes, run_chain
from tests.support.flow import flow_task


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A Prefect API server for the session; yields its URL (``.../api``)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    saved = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # offline: no telemetry
    try:
        with prefect_test_harness(server_startup_timeout=60):
            yield PREFECT_API_URL.value()
    finally:
        if saved is None:
            os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
        else:
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = saved


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """:func:`checkpoint_bytes` of the final checkpoint of the engine's own chain."""
    root = tmp_path_factory.mktemp("reference")
    results = run_chain(flow_task(), root)
    return checkpoint_bytes(results[-1].checkpoint)
