"""A user's mistake under Prefect: refused once, reported as one line, never retried.

Bad input (a :class:`~engine.errors.LoraflowError` with exit code 2: a missing dataset,
a wrong column, a model folder without ``model_index.json``) fails the same way on every
attempt, so retrying it only repeats the failure and its traceback. Two pieces, shared by
every step (``tasks.step``) and the flow:

* :func:`retry_unless_bad_input`, Prefect's ``retry_condition_fn``: no retry for bad input;
  anything else (a storage blip, a crashed worker) keeps its retries;
* :class:`NoTracebackForUserErrors`, a filter on Prefect's run loggers: a record about a
  ``LoraflowError`` keeps its message (``Task run failed with exception: DatasetError(...)``)
  but loses the traceback, on the console and in the UI alike, as the CLI does for
  the same errors (only bugs show a traceback).
"""

from __future__ import annotations

import logging
from typing import Any

from engine.errors import ExitCode, LoraflowError

#: Prefect's loggers for flow and task runs (the engine logs a run's failure through them).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def is_bad_input(error: object) -> bool:
    """True for an error the user must fix before anything can succeed (exit code 2)."""
    return isinstance(error, LoraflowError) and error.exit_code == ExitCode.BAD_INPUT


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` of every step: retry anything but bad input.

    Prefect hands the failed state over with the exception as its data (a plain
    function is required: Prefect checks ``inspect.isfunction``).
    """
    return not is_bad_input(state.data)


class NoTracebackForUserErrors(logging.Filter):
    """Drop the traceback from records about a :class:`LoraflowError`; keep the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, LoraflowError):
            record.exc_info = None
            record.exc_text = None
        return True


def hide_user_error_tracebacks() -> None:
    """Install :class:`NoTracebackForUserErrors` on Prefect's run loggers (once)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(NoTracebackForUserErrors())
