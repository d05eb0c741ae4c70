"""Validation: images at the final checkpoint, rendered the way a user would load the LoRA,
and, with ``validation.validation_steps``, images and the held-out loss of the checkpoint
committed at every N-th step (a task of its own: segments keep their whole budget)."""

from __future__ import annotations

from typing import Any

from engine.data.prepared import load_dataset_for_task
from engine.infer.step_validation import validate_step as validate_checkpoint_at_step
from engine.infer.validation import validate_checkpoint
from engine.task.definition import TaskDefinition
from tasks import step
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import DatasetSummary, Payload, ValidationResult


class DatasetChangedError(RuntimeError):
    """The prepared dataset is not the one the segments trained on."""


@step("validate", retries=1)
def validate_final(
    task: TaskDefinition, checkpoint: str, output_dir: str, dataset: DatasetSummary,
    data_dir: str | None = None,
) -> ValidationResult:
    """Render ``validation.num_images`` images into ``<output_dir>/validation/``.

    Loads the checkpoint's LoRA file into a fresh base pipeline (not the adapted UNet
    that trained it), so the images show what the published file does; a full
    fine-tune's images come from a fresh model holding the checkpoint's trained UNet
    (and text encoders), as the published model does. The prepared
    dataset is found again through ``data_dir`` (prompts may come from its captions);
    its hash must be the one the segments trained on.
    """
    with engine_logs_to_prefect():
        data = trained_data(task, dataset, data_dir)
        images = validate_checkpoint(task, checkpoint, output_dir, data)
        return ValidationResult(images=images.lora, base_images=images.base)


def trained_data(task: TaskDefinition, dataset: DatasetSummary, data_dir: str | None) -> Any:
    """The prepared data the segments trained on, found again; refused if it changed."""
    data = load_dataset_for_task(task, data_dir)
    if data.content_hash != dataset.content_hash:
        raise DatasetChangedError(
            f"the prepared dataset changed during the run ({dataset.content_hash} -> "
            f"{data.content_hash}); prompts would not match the training data"
        )
    return data


class StepValidationResult(Payload):
    """One validated step: ``<output_dir>/validation/step-N/``, each adapter's images
    (``raw``, and ``ema`` when the checkpoint holds an EMA adapter) and held-out loss."""

    global_step: int
    folder: str
    images: dict[str, list[str]]
    loss: dict[str, float]
    source: str  # the held-out set: "validation_dataset" or "training_subset"
    prompts: list[str] = []


@step("validate-step", retries=1)
def validate_step(
    task: TaskDefinition, checkpoint: str, output_dir: str, dataset: DatasetSummary,
    data_dir: str | None = None,
) -> StepValidationResult:
    """Images and held-out loss of the checkpoint committed at a validated step.

    Runs after the segment that committed ``checkpoint`` returned (maybe on another
    worker while the next segment trains), so none of it is in a segment's time box.
    """
    with engine_logs_to_prefect():
        data = trained_data(task, dataset, data_dir)
        done = validate_checkpoint_at_step(task, checkpoint, output_dir, data)
        return StepValidationResult(
            global_step=done.global_step, folder=done.folder, images=done.images,
            loss=done.loss, source=done.source, prompts=done.prompts,
        )
