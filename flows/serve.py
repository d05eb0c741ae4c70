"""``loraflow serve`` and ``loraflow serve-segments``: long-running processes that execute
flow runs of a deployment, started from the UI, the API, a schedule or ``prefect
deployment run``, without work pools or workers to set up.

* ``loraflow serve TASK.json --output-dir URL [--cron ...]`` serves the ``finetune`` flow
  with the task file's contents as its default parameters.
* ``loraflow serve-segments`` serves ``finetune-segment`` on a GPU machine. Start it on
  every GPU machine; a ``finetune`` run with ``segment_deployment=finetune-segment/<name>``
  then hands each segment to whichever of them is free.

Both need a Prefect API that outlives them (``infra/start-prefect-server.sh``, then
``PREFECT_API_URL``): schedules are created by the server's scheduler, which the
temporary in-process server of ``loraflow run`` does not run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flows.run import absolute_location, prepare_prefect_environment

SEGMENT_FLOW = "finetune-segment"


def _require_api() -> str | None:
    """The configured API URL, or a message saying how to get one."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    return (
        "serving needs a Prefect server: start one (infra/start-prefect-server.sh or "
        "`prefect server start`) and set PREFECT_API_URL, e.g. "
        "export PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


def deployment_parameters(args: argparse.Namespace, task: Any) -> dict[str, Any]:
    """The ``finetune`` parameters a served deployment starts its runs with."""
    parameters: dict[str, Any] = {
        "task": task.model_dump(mode="json"),
        "output_dir": absolute_location(args.output_dir),
    }
    optional = {
        "cache_dir": absolute_location(args.cache_dir),
        "data_dir": absolute_location(args.data_dir),
        "budget_seconds": args.budget_seconds,
        "segment_deployment": args.segment_deployment,
    }
    parameters.update({k: v for k, v in optional.items() if v is not None})
    return parameters


def serve_command(args: argparse.Namespace) -> int:
    """Serve ``finetune`` as deployment ``finetune/<name>`` until interrupted."""
    from engine.task.validation import load_task

    task = load_task(args.task)
    prepare_prefect_environment()
    from prefect.deployments.runner import EntrypointType

    from flows.finetune import finetune

    problem = _require_api()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    finetune.serve(
        name=args.name,
        parameters=deployment_parameters(args, task),
        cron=args.cron,
        interval=args.interval,
        tags=["loraflow"],
        description=f"Fine-tune a LoRA from {args.task}",
        limit=args.limit,
        entrypoint_type=EntrypointType.MODULE_PATH,  # importable wherever loraflow is
    )
    return 0


def serve_segments_command(args: argparse.Namespace) -> int:
    """Serve ``finetune-segment/<name>``: this machine trains segments handed to it."""
    prepare_prefect_environment()
    from prefect.deployments.runner import EntrypointType

    from flows.finetune import finetune_segment

    problem = _require_api()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    finetune_segment.serve(
        name=args.name,
        tags=["loraflow"],
        description="One training segment; any free GPU worker takes the next one",
        limit=args.limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
        # several machines serve this one deployment: one of them stopping must not
        # pause it for the others (Prefect pauses a served deployment on shutdown)
        pause_on_shutdown=False,
    )
    return 0
