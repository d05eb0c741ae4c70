"""Long-running processes that execute flow runs of a deployment, started from the UI, the
API, a schedule or ``prefect deployment run``, without work pools or workers to set up.

* :func:`serve_finetune` (``loraflow serve TASK.json --output-dir URL [--cron ...]``)
  serves the ``finetune`` flow with the task file's contents as its default parameters.
* :func:`serve_segments` (``loraflow serve-segments``) serves ``finetune-segment`` on a
  GPU machine. Start it on every GPU machine; a ``finetune`` run with
  ``segment_deployment=finetune-segment/<name>`` then hands each segment to whichever of
  them is free.

Both need a Prefect API that outlives them (``infra/start-prefect-server.sh``, then
``PREFECT_API_URL``): schedules are created by the server's scheduler, which the
temporary in-process server of ``loraflow run`` does not run.
"""

from __future__ import annotations

from typing import Any

from engine.errors import ConfigurationError
from flows.run import prepare_prefect_environment

SEGMENT_FLOW = "finetune-segment"


class NoPrefectServer(ConfigurationError):
    """Serving needs a Prefect API that outlives this process."""


def require_api() -> None:
    """Raise :class:`NoPrefectServer`, saying how to get one, if no API URL is set."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise NoPrefectServer(
            "serving needs a Prefect server: start one (infra/start-prefect-server.sh or "
            "`prefect server start`) and set PREFECT_API_URL, e.g. "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )


def serve_finetune(
    name: str, parameters: dict[str, Any], *, cron: str | None, interval: float | None,
    description: str, limit: int,
) -> None:
    """Serve ``finetune`` as deployment ``finetune/<name>`` until interrupted."""
    prepare_prefect_environment()
    from prefect.deployments.runner import EntrypointType

    from flows.finetune import finetune

    require_api()
    finetune.serve(
        name=name,
        parameters=parameters,
        cron=cron,
        interval=interval,
        tags=["loraflow"],
        description=description,
        limit=limit,
        entrypoint_type=EntrypointType.MODULE_PATH,  # importable wherever loraflow is
    )


def serve_segments(name: str, limit: int) -> None:
    """Serve ``finetune-segment/<name>``: this machine trains segments handed to it."""
    prepare_prefect_environment()
    from prefect.deployments.runner import EntrypointType

    from flows.finetune import finetune_segment

    require_api()
    finetune_segment.serve(
        name=name,
        tags=["loraflow"],
        description="One training segment; any free GPU worker takes the next one",
        limit=limit,
        entrypoint_type=EntrypointType.MODULE_PATH,
        # several machines serve this one deployment: one of them stopping must not
        # pause it for the others (Prefect pauses a served deployment on shutdown)
        pause_on_shutdown=False,
    )
