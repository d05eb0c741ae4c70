"""Encode the dataset's latents and caption embeddings once, before any segment."""

from __future__ import annotations

from engine.data.prepared import default_cache_root, ensure_cache_for_task
from engine.task.definition import TaskDefinition
from tasks import step
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import CacheSummary, DatasetSummary


def cache_root(cache_dir: str | None) -> str:
    """Where caches live: the given location, else ``$LORAFLOW_HOME/cache`` on this worker."""
    return cache_dir or default_cache_root()


@step("build-cache")
def build_cache(
    task: TaskDefinition, dataset: DatasetSummary, data_dir: str | None = None,
    cache_dir: str | None = None,
) -> CacheSummary:
    """The cache for this task, model and data: its address and whether it was built now.

    The cache is keyed by a fingerprint of (model, dataset content, the settings that
    change encodings), so across flow runs the engine finds a committed cache and
    ``built_now`` is False: a second run on the same data never re-encodes. Doing it
    here, not inside segment 0, makes it its own retryable step and keeps the first
    segment's time budget for training. ``dataset`` is an input so the step waits for it
    and its cache key follows the data.
    """
    with engine_logs_to_prefect():
        found = ensure_cache_for_task(task, data_dir, cache_root(cache_dir))
    return CacheSummary(address=found["address"], built_now=found["built_now"],
                        dataset_hash=dataset.content_hash)
