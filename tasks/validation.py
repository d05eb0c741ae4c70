"""Validation images at the final checkpoint, rendered the way a user would load the LoRA."""

from __future__ import annotations

from prefect import task

from engine.data.prepared import load_dataset_for_task
from engine.infer.validation import validate_checkpoint
from engine.task.definition import TaskDefinition
from tasks import RUN_SCOPED
from tasks.logging_bridge import engine_logs_to_prefect


@task(name="validate", retries=1, retry_delay_seconds=5, cache_policy=RUN_SCOPED)
def validate_final(
    task: TaskDefinition, checkpoint: str, output_dir: str, dataset: dict,
    data_dir: str | None = None,
) -> list[str]:
    """Render ``validation.num_images`` images into ``<output_dir>/validation/``.

    Loads the checkpoint's LoRA file into a fresh base pipeline (not the adapted UNet
    that trained it), so the images show what the published file does. The prepared
    dataset is found again through ``data_dir`` (prompts may come from its captions);
    its hash must be the one the segments trained on.
    """
    with engine_logs_to_prefect():
        data = load_dataset_for_task(task, data_dir)
        if data.content_hash != dataset["content_hash"]:
            raise RuntimeError(
                f"the prepared dataset changed during the run ({dataset['content_hash']} -> "
                f"{data.content_hash}); prompts would not match the training data"
            )
        return validate_checkpoint(task, checkpoint, output_dir, data)
