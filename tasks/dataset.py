"""Prepare the task's data once: decode, check and store each subset where segments find it."""

from __future__ import annotations

from engine.data.epoch_summary import epoch_summary
from engine.data.prepared import open_subsets, prepare_subsets
from engine.lora.metadata import subset_names
from engine.task.definition import TaskDefinition
from tasks import step
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import DatasetSummary, tagged_skipped


@step("prepare-dataset")
def prepare_dataset(task: TaskDefinition, data_dir: str | None = None) -> DatasetSummary:
    """Every subset prepared: where each lives, how many examples, the hash of all.

    Also how many images were skipped (unreadable, too small, ...) with the first
    :data:`~tasks.payloads.SKIPPED_SHOWN` of them (file and reason): the full lists stay
    in the prepared datasets' manifests, out of Prefect's parameters and results. And
    what one epoch holds (buckets, subsets, uses, batches), for the run summary and the
    UI, known before any step is trained.

    The engine keeps prepared data at an address derived from each subset's arguments
    (and buckets), so a second run (or a segment on another worker with the same
    ``data_dir``) finds it.
    """
    with engine_logs_to_prefect():
        manifests = prepare_subsets(task, data_dir)
        data = open_subsets(task, manifests)
        names = subset_names(task)
        epoch = epoch_summary(data, task.train_args.batch_size, names,
                              tagged_skipped(manifests, names))
    return DatasetSummary.of_subsets(manifests, names, data.content_hash, epoch)
