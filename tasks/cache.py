"""Encode the dataset's latents and caption embeddings once, before any segment."""

from __future__ import annotations

from prefect import task

from engine.data.prepared import default_cache_root, ensure_cache_for_task
from engine.task.definition import TaskDefinition
from tasks import RUN_SCOPED
from tasks.logging_bridge import engine_logs_to_prefect


def cache_root(cache_dir: str | None) -> str:
    """Where caches live: the given location, else ``$LORAFLOW_HOME/cache`` on this worker."""
    return cache_dir or default_cache_root()


@task(name="build-cache", retries=2, retry_delay_seconds=5, cache_policy=RUN_SCOPED)
def build_cache(
    task: TaskDefinition, dataset: dict, data_dir: str | None = None, cache_dir: str | None = None
) -> dict:
    """``{"address", "built_now"}`` of the cache for this task, model and data.

    The cache is keyed by a fingerprint of (model, dataset content, the settings that
    change encodings), so across flow runs the engine finds a committed cache and
    ``built_now`` is False: a second run on the same data never re-encodes. Doing it
    here, not inside segment 0, makes it its own retryable step and keeps the first
    segment's time budget for training. ``dataset`` (the manifest) is an input so the
    step waits for it and its cache key follows the data.
    """
    with engine_logs_to_prefect():
        result = ensure_cache_for_task(task, data_dir, cache_root(cache_dir))
    return {**result, "dataset_hash": dataset["content_hash"]}
