"""Validation images at the final checkpoint, rendered the way a user would load the LoRA."""

from __future__ import annotations

from engine.data.prepared import load_dataset_for_task
from engine.infer.validation import validate_checkpoint
from engine.task.definition import TaskDefinition
from tasks import step
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import DatasetSummary, ValidationResult


class DatasetChangedError(RuntimeError):
    """The prepared dataset is not the one the segments trained on."""


@step("validate", retries=1)
def validate_final(
    task: TaskDefinition, checkpoint: str, output_dir: str, dataset: DatasetSummary,
    data_dir: str | None = None,
) -> ValidationResult:
    """Render ``validation.num_images`` images into ``<output_dir>/validation/``.

    Loads the checkpoint's LoRA file into a fresh base pipeline (not the adapted UNet
    that trained it), so the images show what the published file does. The prepared
    dataset is found again through ``data_dir`` (prompts may come from its captions);
    its hash must be the one the segments trained on.
    """
    with engine_logs_to_prefect():
        data = load_dataset_for_task(task, data_dir)
        if data.content_hash != dataset.content_hash:
            raise DatasetChangedError(
                f"the prepared dataset changed during the run ({dataset.content_hash} -> "
                f"{data.content_hash}); prompts would not match the training data"
            )
        images = validate_checkpoint(task, checkpoint, output_dir, data)
        return ValidationResult(images=images.lora, base_images=images.base)
