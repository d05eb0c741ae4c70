"""DreamBooth class images: generated (or found) once, then trained as one more subset."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact

from engine.data.class_subset import class_subset_names
from engine.data.epoch_summary import epoch_summary
from engine.data.layout import DatasetManifest
from engine.data.prepared import default_data_root, load_dataset_for_task
from engine.infer.class_images import ensure_class_subset
from engine.lora.metadata import subset_names
from engine.task.definition import TaskDefinition
from tasks import step
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import DatasetSummary, Payload, tagged_skipped


class ClassImagesSummary(Payload):
    """The data with the class subset added, and where its images came from."""

    dataset: DatasetSummary  # every subset, the class subset last: what segments train on
    class_images: dict[str, Any]  # count, from_folder, generated, reused


@step("class-images")
def class_images(task: TaskDefinition, dataset: DatasetSummary,
                 data_dir: str | None = None) -> ClassImagesSummary:
    """Generate the class images the task still lacks (none on a re-run) and prepare them
    as the class subset; the data summary then covers every subset, so the cache,
    segments, validation and publishing see the class subset too.

    ``dataset`` (the prepared instance subsets) is an input so this step runs after them:
    a broken dataset is refused before minutes of generation.
    """
    with engine_logs_to_prefect():
        found = ensure_class_subset(task, data_dir or default_data_root())
        data = load_dataset_for_task(task, data_dir)  # every subset as training sees it
        manifests = [DatasetManifest.of(part.address, part.manifest) for part in data.parts]
        names = subset_names(task) + class_subset_names(task)
        epoch = epoch_summary(data, task.train_args.batch_size, names,
                              tagged_skipped(manifests, names))
    counts = found.counts()
    create_markdown_artifact(
        f"**DreamBooth class images** for `{task.dreambooth.class_prompt}`: "
        f"{counts['count']} in all, {counts['generated']} generated now, "
        f"{counts['reused']} found from an earlier run, {counts['from_folder']} from "
        "class_data_dir.",
        description="DreamBooth class images: generated vs reused",
    )
    return ClassImagesSummary(
        dataset=DatasetSummary.of_subsets(manifests, names, data.content_hash, epoch),
        class_images=counts,
    )


def add_class_images(task: TaskDefinition, dataset: DatasetSummary,
                     data_dir: str | None) -> tuple[DatasetSummary, dict[str, Any] | None]:
    """The flow's call: (data with the class subset, class image counts) with DreamBooth;
    the data as it is, and None, without."""
    if task.dreambooth is None:
        return dataset, None
    made = class_images(task, dataset, data_dir)
    return made.dataset, made.class_images
