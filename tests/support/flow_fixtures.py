"""Fixtures of the flow tests, as a plugin: ``pytest_plugins = ["tests.support.flow_fixtures"]``.

* ``prefect_api`` (session): a real Prefect API server for the whole session, from
  ``prefect_test_harness`` (a subprocess server on a temporary SQLite database);
  ``PREFECT_HOME`` is already a temp folder (conftest). Its URL is returned, so tests can
  point subprocesses at the same server.
* ``reference_run`` (session): the engine's own single-process chain of segments for
  :func:`tests.support.flow.flow_task`, the bit-for-bit yardstick of every flow test.
* ``fail_segment_once``: arms a fault in the ``train-segment`` task of this process: one
  segment raises right after a given optimizer step, on its first attempt only. It
  goes through the engine's production ``on_step`` callback; production code reads no
  switch for it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.store import storage
from engine.train.options import SegmentOptions, StepReport
from tests.support.engine import checkpoint_bytes, run_chain
from tests.support.flow import FAULT_MARKER, InjectedFault, flow_task


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


@pytest.fixture
def fail_segment_once(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, int], None]:
    """``arm(index, after_step)``: segment ``index`` fails after ``after_step``, once.

    Wraps the engine call of ``tasks.segment`` (this process only, undone after the
    test) so that the segment's ``on_step`` callback raises :class:`InjectedFault`. The
    first attempt writes :data:`FAULT_MARKER` in the segment's folder before raising; a
    retry sees it and runs clean, as a real transient fault would.
    """
    import tasks.segment

    real_run_segment = tasks.segment.run_segment

    def arm(index: int, after_step: int) -> None:
        def run_segment(task: Any, output_dir: str, opts: SegmentOptions | None = None) -> Any:
            opts = opts or SegmentOptions()
            marker = storage.join(output_dir, FAULT_MARKER)
            if storage.basename(output_dir) != f"{index:04d}" or storage.exists(marker):
                return real_run_segment(task, output_dir, opts)
            production = opts.on_step

            def on_step(report: StepReport) -> None:
                if production is not None:
                    production(report)
                if report.global_step >= after_step:
                    step = report.global_step
                    storage.write_bytes(marker, f"failed after step {step}\n".encode())
                    raise InjectedFault(f"segment {index} fails after step {step} (first attempt)")

            return real_run_segment(task, output_dir, dataclasses.replace(opts, on_step=on_step))

        monkeypatch.setattr(tasks.segment, "run_segment", run_segment)

    return arm
