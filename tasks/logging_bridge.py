"""Show the engine's log lines in the Prefect run they belong to.

The engine logs through the standard ``logging`` module (logger ``engine`` and its
children) and knows nothing about Prefect. Prefect's own switch for this,
``PREFECT_LOGGING_EXTRA_LOGGERS=engine``, only takes effect if it is in the environment
before Prefect configures logging (at import) and leaves the level of ``engine`` to the
root logger (WARNING under Prefect's default config), so INFO lines such as "committed
... at step 20" would be lost. A handler added for the duration of one task is explicit
and independent of the process environment: whatever the engine logs while the task
runs goes to the task run's logger, which Prefect sends to the API (the UI) and prints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger

ENGINE_LOGGER = "engine"


class RunLoggerHandler(logging.Handler):
    """Re-emit each engine record through a Prefect run logger (keeps level and traceback)."""

    def __init__(self, run_logger: logging.LoggerAdapter) -> None:
        super().__init__(level=logging.NOTSET)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_logger.log(
                record.levelno, "[%s] %s", record.name, record.getMessage(),
                exc_info=record.exc_info,
            )
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


@contextmanager
def engine_logs_to_prefect(level: int = logging.INFO) -> Iterator[None]:
    """Forward ``engine`` logs at ``level`` and above to the current run's logger.

    A lower level already in force (``loraflow -v`` sets DEBUG) is kept.

    While active, ``engine`` does not propagate to the root logger: the run logger
    already prints to the console (Prefect's handler), so a root handler set up by the
    ``loraflow`` CLI would otherwise print every line twice.
    """
    logger = logging.getLogger(ENGINE_LOGGER)
    handler = RunLoggerHandler(get_run_logger())
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate
