"""Prefect tasks: one thin wrapper per pipeline step (dataset, cache, segment, validation,
publish). Each turns small inputs (addresses, hashes, counts) into one engine call and
returns small outputs (:mod:`tasks.payloads`); tensors never cross a task boundary.

Every step is declared through :func:`step`, so retries, their condition and the cache
policy are written once.

Cache policy, shared by every step: ``RUN_SCOPED = INPUTS + TASK_SOURCE + RUN_ID``.
The key is stable within one flow run, so retrying a failed or crashed flow run reuses
the persisted result of every step that already completed (Prefect shows them as
``Cached``) and resumes at the first one that did not. It changes with the flow run,
so a *new* run always asks the engine again; the engine's own idempotence then makes
that cheap (a committed dataset, cache or segment is found and returned as it is) and,
unlike a cross-run Prefect cache, cannot hand back a result whose files were deleted
in the meantime. ``TASK_SOURCE`` keeps a retry after a code change from reusing
results of the old code.

Retries: a failed step is retried after a delay, unless it failed on bad input
(:func:`tasks.user_errors.retry_unless_bad_input`): that would fail the same way again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE

from tasks.user_errors import retry_unless_bad_input

RUN_SCOPED = INPUTS + TASK_SOURCE + RUN_ID


def step(name: str, *, retries: int = 2, retry_delay_seconds: float = 5,
         not_in_cache_key: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """``@task`` for a pipeline step: run-scoped cache, retries except on bad input.

    ``not_in_cache_key`` names parameters that do not change the result (where progress
    is shown): a retried flow run hands them new values and must still find the step.
    """
    inputs = INPUTS
    for parameter in not_in_cache_key:
        inputs = inputs - parameter
    policy = inputs + TASK_SOURCE + RUN_ID  # RUN_SCOPED, less those parameters
    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_unless_bad_input,
        cache_policy=policy if not_in_cache_key else RUN_SCOPED,
    )


__all__ = ["RUN_SCOPED", "step"]
