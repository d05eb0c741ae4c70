"""The ``finetune`` flow in this process: ``loraflow run`` and ``loraflow retry``.

Without ``PREFECT_API_URL`` Prefect starts a temporary local API server for the
duration of the run backed by ``$PREFECT_HOME/prefect.db`` (``~/.prefect``), so the run
is recorded and can be retried with ``loraflow retry``. With ``PREFECT_API_URL`` set
(``prefect server start`` or Prefect Cloud) the run shows in that UI.

How a run ends is said by :func:`outcome`: the run's summary, or an exception that
carries the exit code (:class:`~engine.errors.LoraflowError`), which the CLI prints as
one line, like every other error it maps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from engine.errors import ExitCode, LoraflowError
from engine.task.definition import TaskDefinition

#: Settings for a local run that works the first time, quietly and offline; the user's
#: own values win.
PREFECT_DEFAULTS = {
    # the temporary server would try to send usage telemetry (and log its failure offline)
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server's first start creates and migrates its database: 25-40 s
    # measured on a busy 2-core machine, more than Prefect's 20 s default (the first
    # command then failed with "Timed out while attempting to connect to ephemeral
    # Prefect API server"). Prefect counts only its own polling sleeps toward this, so
    # the real wait can be longer still; a server that does come up answers much sooner.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


class RunFailed(LoraflowError):
    """The flow run ended without completing, for a reason that is not the user's input.

    The cause's traceback is in the run's logs (Prefect logged it); here it is one line.
    """

    exit_code = ExitCode.FAILED


class FlowRunNotFound(LoraflowError, LookupError):
    """No flow run has this id or name."""


class NothingToRetry(LoraflowError, ValueError):
    """The flow run completed, or still runs (retry it with ``force`` if it is gone)."""


class _DropTemporaryServerNotice(logging.Filter):
    """Hide Prefect's "Starting/Stopping temporary server ..." lines (and their doc link)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "temporary server" not in str(record.msg)


def prepare_prefect_environment() -> None:
    """Apply :data:`PREFECT_DEFAULTS` before Prefect is imported (it reads them once).

    A ``PREFECT_HOME`` whose parent folder does not exist is created here: Prefect makes
    only the last level, and its temporary server then fails to open its database and
    restarts in a loop until the start-up timeout (minutes), ending in a traceback.
    """
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if os.environ.get("PREFECT_HOME"):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    prefect_logger = logging.getLogger("prefect")
    if not any(isinstance(f, _DropTemporaryServerNotice) for f in prefect_logger.filters):
        prefect_logger.addFilter(_DropTemporaryServerNotice())


def use_prefect_format_on_root_handlers() -> None:
    """Keep run names in console lines when the CLI installed its own root handler.

    Prefect leaves a user's root handler alone (3.8 drops its own root config then), so
    its run loggers would print as ``prefect.task_runs: ...`` without saying which run.
    """
    from prefect.logging.formatters import PrefectFormatter

    formatter = PrefectFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
        flow_run_fmt="%(asctime)s %(levelname)s flow run %(flow_run_name)r: %(message)s",
        task_run_fmt="%(asctime)s %(levelname)s task run %(task_run_name)r: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # what logging.basicConfig installs
            handler.setFormatter(formatter)


def is_url(location: str) -> bool:
    return "://" in location


def absolute_location(location: str | None) -> str | None:
    """Local paths become absolute: the summary and the published card then say where."""
    if location is None or is_url(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def start_prefect() -> None:
    """Set up Prefect for a run in this process: settings first, then import, then logs."""
    prepare_prefect_environment()
    import flows.finetune  # noqa: F401 - imports Prefect, which configures its logging

    use_prefect_format_on_root_handlers()


def run_here(
    task: TaskDefinition, output_dir: str, *, cache_dir: str | None = None,
    data_dir: str | None = None, budget_seconds: float | None = None,
    overrides: list[str] | None = None, processes_per_segment: int | None = None,
) -> Any:
    """Run ``finetune`` in this process; return its final state (see :func:`outcome`).

    ``overrides``: the command line's ``key.path=value`` already applied to ``task``, for
    the run summary."""
    start_prefect()
    from flows.finetune import finetune

    return finetune(
        task=task,
        output_dir=absolute_location(output_dir),
        cache_dir=absolute_location(cache_dir),
        data_dir=absolute_location(data_dir),
        budget_seconds=budget_seconds,
        overrides=list(overrides or []),
        processes_per_segment=processes_per_segment,
        return_state=True,
    )


def outcome(state: Any) -> dict[str, Any]:
    """The summary of a completed ``finetune`` run; else raise why it did not complete.

    A user's error (bad input, storage down, ...) is raised as it is, with its own exit
    code; anything else as :class:`RunFailed`.
    """
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    if isinstance(error, LoraflowError):
        raise error
    cause = ""
    if isinstance(error, BaseException):
        cause = f"\n  cause: {type(error).__name__}: {error}"
    raise RunFailed(f"the fine-tuning run ended {state.name}: {state.message}{cause}")


def find_flow_run(client: Any, ref: str) -> Any:
    """A flow run by id, or by name (the newest of that name)."""
    from uuid import UUID

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    try:
        return client.read_flow_run(UUID(ref))
    except ValueError:
        pass
    # limit and sort explicit: the 3.8.8 client sends None, which its server refuses (422)
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[ref])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=1,
    )
    if not runs:
        raise FlowRunNotFound(f"no flow run named or with id {ref!r}")
    return runs[0]


def retry_flow_run(ref: str, *, force: bool = False) -> Any:
    """Run a failed or crashed ``finetune`` flow run again, here, as the same flow run.

    The same flow run id makes every task's cache key (inputs + run id) the same as in
    the first attempt, so completed steps come back ``Cached`` and training resumes at
    the first segment that had not committed. This is what the UI's "Retry" does for a
    deployment, for runs started by ``loraflow run`` (no worker to pick them up).

    A run whose process was killed stays ``Running`` in the API (no one reported the
    crash); ``force`` retries it anyway: make sure it is really gone.
    """
    from prefect import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import AwaitingRetry

    from flows.finetune import finetune

    with get_client(sync_client=True) as client:
        run = find_flow_run(client, ref)
        state = run.state
        if state is not None and state.is_completed():
            raise NothingToRetry(
                f"flow run {run.name} ({run.id}) already completed; nothing to retry"
            )
        if state is not None and not state.is_final() and not force:
            raise NothingToRetry(
                f"flow run {run.name} ({run.id}) is {state.name}; if its process is gone "
                "(killed, machine lost), retry with --force"
            )
        client.set_flow_run_state(run.id, AwaitingRetry(), force=True)
        run = client.read_flow_run(run.id)
    return run_flow(finetune, flow_run=run, parameters=run.parameters, return_type="state")
