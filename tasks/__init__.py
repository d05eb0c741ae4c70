"""Prefect tasks: one thin wrapper per pipeline step (dataset, cache, segment, validation,
publish). Each turns small inputs (addresses, hashes, counts) into one engine call and
returns small outputs; tensors never cross a task boundary.

Cache policy, shared by every step: ``RUN_SCOPED = INPUTS + TASK_SOURCE + RUN_ID``.
The key is stable within one flow run, so retrying a failed or crashed flow run reuses
the persisted result of every step that already completed (Prefect shows them as
``Cached``) and resumes at the first one that did not. It changes with the flow run,
so a *new* run always asks the engine again; the engine's own idempotence then makes
that cheap (a committed dataset, cache or segment is found and returned as it is) and,
unlike a cross-run Prefect cache, cannot hand back a result whose files were deleted
in the meantime. ``TASK_SOURCE`` keeps a retry after a code change from reusing
results of the old code.
"""

from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE

RUN_SCOPED = INPUTS + TASK_SOURCE + RUN_ID

__all__ = ["RUN_SCOPED"]
