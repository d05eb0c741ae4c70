"""Publish the finished training: the LoRA (diffusers + kohya files) or, for a full
fine-tune, the whole model (diffusers folder + single file); with the model card, metrics
and run summary."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect.runtime import flow_run

from engine.data.prepared import load_dataset_for_task
from engine.lora.publish import publish_lora
from engine.model.full_publish import publish_full_run
from engine.store import storage
from engine.task.definition import TaskDefinition
from tasks import step
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import (
    DatasetSummary,
    PublishResult,
    RunSummary,
    ValidationResult,
)


def merge_metrics(metrics_urls: list[str], target: str) -> str | None:
    """Concatenate the segments' ``metrics.jsonl`` (in order) into one file at ``target``.

    A segment that was found already committed on a re-run contributes its file once,
    as written by the attempt that committed it: no step appears twice.
    """
    parts = [storage.read_bytes(url) for url in metrics_urls if url]
    if not parts:
        return None
    storage.write_bytes(target, b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts))
    return target


@step("publish")
def publish(
    task: TaskDefinition,
    checkpoint: str,
    output_dir: str,
    dataset: DatasetSummary,
    validation: ValidationResult,
    segment_metrics: list[str],
    run_summary: RunSummary,
    data_dir: str | None = None,
) -> PublishResult:
    """Write ``<output_dir>/lora/`` from the final checkpoint; return the URLs written.

    A full fine-tune (``training_type: "full"``) has no LoRA file: it is published as
    ``<output_dir>/model/`` (engine/model/full_publish.py), never through the LoRA
    writers.

    Publishing rewrites the same files when run again (a retry after a crash mid-write
    is harmless). The dates in the summary are the flow run's scheduled start (stable
    across retries of the run) and now.
    """
    with engine_logs_to_prefect():
        data = load_dataset_for_task(task, data_dir)
        captions = [(data.captions(i) or [""])[0] for i in range(len(data))]
        metrics_url = merge_metrics(
            segment_metrics, storage.join(output_dir, "metrics", "metrics.jsonl"),
        )
        started = flow_run.scheduled_start_time
        summary = {
            **run_summary.model_dump(mode="json"),
            "started_at": started.isoformat() if started else None,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if task.training_type == "full":
            published = publish_full_run(
                checkpoint, task, output_dir, dataset_hash=dataset.content_hash,
                validation_images=validation.images, base_images=validation.base_images,
                metrics_url=metrics_url, run_summary=summary,
            )
            return PublishResult(training_type="full", lora_dir=None, diffusers=None,
                                 kohya=None, **published)
        published = publish_lora(
            checkpoint, task, output_dir,
            dataset_hash=dataset.content_hash,
            captions=captions,
            validation_images=validation.images,
            base_images=validation.base_images,
            metrics_url=metrics_url,
            run_summary=summary,
        )
    known = {k: v for k, v in published.items() if k in PublishResult.model_fields}
    variants = {k: v for k, v in published.items() if k not in PublishResult.model_fields}
    return PublishResult(**known, variants=variants)
