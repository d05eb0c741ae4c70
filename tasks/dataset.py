"""Prepare the task's dataset once: decode, check and store it where segments find it."""

from __future__ import annotations

from engine.data.prepared import prepare_for_task
from engine.task.definition import TaskDefinition
from tasks import step
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import DatasetSummary


@step("prepare-dataset")
def prepare_dataset(task: TaskDefinition, data_dir: str | None = None) -> DatasetSummary:
    """The dataset manifest: where the prepared data lives, how many examples, its hash.

    Also how many images were skipped (unreadable, too small, ...) with the first
    :data:`~tasks.payloads.SKIPPED_SHOWN` of them (file and reason): the full list stays
    in the prepared dataset's manifest, out of Prefect's parameters and results.

    The engine keeps prepared data at an address derived from the dataset arguments, so
    a second run (or a segment on another worker with the same ``data_dir``) finds it.
    """
    with engine_logs_to_prefect():
        manifest = prepare_for_task(task, data_dir)
    return DatasetSummary.of_manifest(manifest)
