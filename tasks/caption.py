"""Caption the images that have none (``captioning``), before anything is encoded."""

from __future__ import annotations

from typing import Any

from engine.data.epoch_summary import epoch_summary
from engine.data.prepared import caption_manifests, open_subsets, prepare_subsets
from engine.lora.metadata import subset_names
from engine.store import storage
from engine.store.redact import redact_values
from engine.task.definition import TaskDefinition
from tasks import step
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import DatasetSummary, Payload, tagged_skipped


class CaptionStepSummary(Payload):
    """The data with its captions, and what the captioner did."""

    dataset: DatasetSummary  # the captioned subsets: what the cache and segments read
    captions: dict[str, Any]  # captioned now, from the cache, kept, uncaptioned (why)


@step("caption")
def caption(task: TaskDefinition, dataset: DatasetSummary,
            data_dir: str | None = None) -> CaptionStepSummary:
    """Caption every subset's images the way ``captioning`` says, each answer cached by
    (image, model, prompt): a re-run or a retried flow captions nothing twice, and a
    dataset captioned before is used as it is. Writes each captioned dataset's editable
    ``metadata.jsonl``; its summary has the first image + caption pairs (the flow shows
    them as an artifact).

    ``dataset`` (the prepared subsets) is an input so this step runs after them.
    """
    with engine_logs_to_prefect():
        manifests, done = caption_manifests(task, prepare_subsets(task, data_dir), data_dir)
        data = open_subsets(task, manifests)
        names = subset_names(task)
        epoch = epoch_summary(data, task.train_args.batch_size, names,
                              tagged_skipped(manifests, names))
    return CaptionStepSummary(
        dataset=DatasetSummary.of_subsets(manifests, names, data.content_hash, epoch),
        captions=redact_values(done.to_dict()),
    )


def add_captions(task: TaskDefinition, dataset: DatasetSummary,
                 data_dir: str | None) -> tuple[DatasetSummary, dict[str, Any] | None]:
    """The flow's call: (captioned data, what was done) with ``captioning``; the data as
    it is, and None, without."""
    if task.captioning is None:
        return dataset, None
    made = caption(task, dataset, data_dir)
    return made.dataset, made.captions


#: Image + caption pairs the run summary keeps per subset (the captions file has all).
SUMMARY_PAIRS = 8


def caption_counts(captions: dict[str, Any]) -> dict[str, Any]:
    """What the run summary keeps of the caption step: its counts, why images stayed
    uncaptioned, and each subset's captions file (relative to the data folder: the summary
    is published, local paths are not) with its first image + caption pairs."""
    keys = ("captioned", "from_cache", "kept", "uncaptioned")
    return {key: captions[key] for key in keys} | {"subsets": {
        index: {"captions_file": "/".join([storage.basename(report["address"]),
                                           storage.basename(report["metadata"])]),
                "pairs": report["pairs"][:SUMMARY_PAIRS]}
        for index, report in captions["subsets"].items()
    }}
