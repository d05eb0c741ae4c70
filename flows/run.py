"""``loraflow run``: the whole pipeline in this process, no server to start first.

Without ``PREFECT_API_URL`` Prefect starts a temporary local API server for the
duration of the run (a few seconds) backed by ``$PREFECT_HOME/prefect.db``
(``~/.prefect``), so the run is recorded and can be retried with ``loraflow retry``.
With ``PREFECT_API_URL`` set (``prefect server start`` or Prefect Cloud) the run shows
in that UI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

#: Settings for a quiet, offline-friendly local run; the user's own values win.
PREFECT_DEFAULTS = {
    # the temporary server would try to send usage telemetry (and log its failure offline)
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class _DropTemporaryServerNotice(logging.Filter):
    """Hide Prefect's "Starting/Stopping temporary server ..." lines (and their doc link)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "temporary server" not in str(record.msg)


def prepare_prefect_environment() -> None:
    """Apply :data:`PREFECT_DEFAULTS` before Prefect is imported (it reads them once)."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
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


def describe(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: where the LoRA is and how training went."""
    from engine.store.storage import redact

    lora = summary["lora"]
    lines = [f"LoRA published to {redact(lora['lora_dir'])}"]
    for label in ("diffusers", "kohya", "readme"):
        if lora.get(label):
            lines.append(f"  {label:<10} {redact(lora[label])}")
    for image in summary.get("validation", []):
        lines.append(f"  {'image':<10} {redact(image)}")
    lines.append(
        f"trained {summary['global_step']} steps in {summary['segments']} segment(s); "
        f"final checkpoint {redact(summary['checkpoint'])}"
    )
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    """Run the ``finetune`` flow for ``args.task``; print a summary; return the exit code."""
    from engine.task.validation import load_task

    task = load_task(args.task)  # bad input is refused here, before Prefect starts
    prepare_prefect_environment()
    from flows.finetune import finetune

    use_prefect_format_on_root_handlers()
    state = finetune(
        task=task,
        output_dir=absolute_location(args.output_dir),
        cache_dir=absolute_location(args.cache_dir),
        data_dir=absolute_location(args.data_dir),
        budget_seconds=args.budget_seconds,
        return_state=True,
    )
    return report_state(state)


def report_state(state: Any) -> int:
    """Print the summary of a finished flow run, or why it failed; return the exit code."""
    from engine.errors import ExitCode, LoraflowError

    if state.is_completed():
        print(describe(state.result()))
        return ExitCode.OK
    error = state.result(raise_on_failure=False)
    if isinstance(error, LoraflowError):  # bad input (2), storage (4), ...: its own code
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"error: the fine-tuning run ended {state.name}: {state.message}", file=sys.stderr)
    if isinstance(error, BaseException):
        print(f"  cause: {type(error).__name__}: {error}", file=sys.stderr)
    return ExitCode.FAILED


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
        raise LookupError(f"no flow run named or with id {ref!r}")
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
            raise ValueError(f"flow run {run.name} ({run.id}) already completed; nothing to retry")
        if state is not None and not state.is_final() and not force:
            raise ValueError(
                f"flow run {run.name} ({run.id}) is {state.name}; if its process is gone "
                "(killed, machine lost), retry with --force"
            )
        client.set_flow_run_state(run.id, AwaitingRetry(), force=True)
        run = client.read_flow_run(run.id)
    return run_flow(finetune, flow_run=run, parameters=run.parameters, return_type="state")


def retry_command(args: argparse.Namespace) -> int:
    """``loraflow retry FLOW_RUN``: resume a failed or crashed run; print the summary."""
    prepare_prefect_environment()
    from flows.finetune import finetune  # noqa: F401 - configures Prefect logging first

    use_prefect_format_on_root_handlers()
    try:
        state = retry_flow_run(args.flow_run, force=args.force)
    except (LookupError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_state(state)
