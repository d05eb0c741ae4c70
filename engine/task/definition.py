"""The fine-tuning task definition: one typed model, the single source of truth.

Field names, nesting, defaults and meaning follow the Crynux `FinetuneLoraTaskArgs`
format, so any document a Crynux node accepts means the same here. loraflow's own
additions are optional fields whose defaults leave a Crynux task's meaning unchanged;
each says so in its description. Unknown keys are refused (``extra="forbid"``): a typo
must not silently change nothing.

The committed JSON Schema (``engine/task/schema/finetune-task.schema.json``) is generated
from these classes by :func:`task_json_schema`; a test keeps the two in step.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

#: Task format versions this build understands, oldest first. The last is current.
TaskVersion = Literal["1.0.0", "2.0.0", "2.1.0", "2.5.0", "2.5.2"]
KNOWN_VERSIONS: tuple[str, ...] = get_args(TaskVersion)
CURRENT_VERSION = KNOWN_VERSIONS[-1]
#: The version of a document that names none: Crynux's default.
DEFAULT_DOCUMENT_VERSION = "2.5.0"

#: The UNet attention projections adapted when ``lora.target_modules`` is null.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

LrSchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
LoraFormat = Literal["diffusers", "kohya"]


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are re-validated on edit."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelArgs(_Strict):
    name: str = Field(
        min_length=1,
        description="Hub model ID or local path of a diffusers-format SD 1.x / 2.x / SDXL model. "
        "The ids loraflow/tiny-sd1, loraflow/tiny-sd2 and loraflow/tiny-sdxl name small "
        "random-weight models that loraflow builds locally.",
    )
    variant: str | None = Field(None, description="Weight file variant to load, e.g. fp16.")
    revision: str = Field("main", description="Branch, tag or commit of the model repository.")
    # loraflow additions
    vae: str | None = Field(
        None,
        min_length=1,
        description="loraflow: a VAE (Hub ID or local diffusers folder) to use instead of the "
        "model's, e.g. a fixed SDXL VAE that does not overflow in fp16. null: the model's own "
        "VAE (SDXL's is then run in fp32 under fp16 training).",
    )


class DatasetArgs(_Strict):
    url: str | None = Field(
        None,
        min_length=1,
        max_length=2083,
        description="URL (http(s) or any fsspec URL) of a zip or tar(.gz/.bz2/.xz) archive "
        "holding the dataset. Exactly one of url and name is set.",
    )
    name: str | None = Field(
        None,
        min_length=1,
        description="Hub dataset ID or local path (imagefolder, or parquet/csv/json/arrow "
        "files). loraflow/demo-shapes names a small demo set built locally.",
    )
    config_name: str | None = Field(None, description="Dataset configuration, if it has several.")
    image_column: str = Field("image", description="Column holding the image.")
    caption_column: str = Field(
        "text", description="Column holding the caption; a list of captions means pick one."
    )


class ValidationArgs(_Strict):
    prompt: str | None = Field(
        None,
        description="Prompt for validation images; null draws num_images captions from the "
        "dataset, by seed.",
    )
    num_images: int = Field(4, ge=1, le=10, description="Validation images per segment.")
    # loraflow additions
    num_inference_steps: int = Field(
        25, ge=1, le=1000, description="loraflow: denoising steps per validation image."
    )
    guidance_scale: float = Field(
        7.5, ge=0, le=100, description="loraflow: classifier-free guidance scale for validation."
    )


class LRSchedulerArgs(_Strict):
    lr_scheduler: LrSchedulerName = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(500, ge=0, description="Linear warmup steps.")


class AdamOptimizerArgs(_Strict):
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    epsilon: float = Field(1e-8, gt=0)


class TrainArgs(_Strict):
    learning_rate: float = Field(1e-4, gt=0, description="Initial learning rate after warmup.")
    batch_size: int = Field(16, ge=1, description="Samples per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Training target; null: the model scheduler's own prediction_type."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    num_train_epochs: int = Field(1, ge=1, description="Epochs done by THIS segment.")
    num_train_steps: int | None = Field(
        None, ge=1, description="Optimizer steps done by THIS segment; overrides num_train_epochs."
    )
    max_train_epochs: int = Field(1, ge=1, description="Epochs of the WHOLE training.")
    max_train_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps of the WHOLE training; overrides max_train_epochs; also "
        "the length of the learning-rate schedule.",
    )
    scale_lr: bool = Field(
        True, description="Multiply lr by gradient_accumulation_steps * batch_size * processes."
    )
    resolution: int = Field(512, ge=1, description="Square training size in pixels.")
    noise_offset: float = Field(0, ge=0, description="Noise offset scale.")
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR loss weighting gamma (5.0 is usual); null: plain MSE."
    )
    lr_scheduler: LRSchedulerArgs = Field(default_factory=LRSchedulerArgs)
    adam_args: AdamOptimizerArgs = Field(default_factory=AdamOptimizerArgs)
    # loraflow additions
    segment_budget_seconds: float | None = Field(
        None,
        gt=0,
        description="loraflow: wall-clock budget of one segment in seconds. The segment "
        "stops early enough to commit its checkpoint within it. null: no budget.",
    )
    cache: Literal["auto", "off"] = Field(
        "auto",
        description="loraflow: 'auto' trains from precomputed VAE latents and text "
        "embeddings when the transforms allow it (not with random crop: then only the "
        "text embeddings are cached); 'off' encodes every step. Same result either way.",
    )
    checkpointing_steps: int | None = Field(
        None,
        ge=1,
        description="loraflow: also commit a checkpoint every this many optimizer steps inside "
        "a segment (under output_dir/checkpoints/), so a killed segment loses at most this "
        "many steps when it is run again. null: only at the end of the segment.",
    )
    checkpoints_total_limit: int | None = Field(
        None,
        ge=1,
        description="loraflow: keep only the newest this many in-segment checkpoints; older "
        "ones are deleted only after a newer one is committed. null: keep all.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="loraflow: recompute UNet activations in the backward pass: much less "
        "memory, about 20-30% slower. Same result.",
    )
    channels_last: bool = Field(
        False,
        description="loraflow: run the UNet in channels-last memory format (faster convolutions "
        "on recent GPUs). Results may differ from channels-first in the last bits.",
    )


#: The CLIP text-encoder projections adapted when ``lora.text_encoder.target_modules`` is null.
DEFAULT_TEXT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


class TextEncoderLoraArgs(_Strict):
    """loraflow addition: a LoRA on the text encoder(s) as well (both of them for SDXL)."""

    rank: int = Field(4, ge=1, le=1024, description="LoRA rank of the text-encoder adapter.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; null: alpha = rank.")
    target_modules: list[str] | str | None = Field(
        None, description="Text-encoder modules to adapt; null: q_proj, k_proj, v_proj, out_proj."
    )
    learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the text-encoder adapter; null: the UNet's."
    )


class LoraArgs(_Strict):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    init_lora_weights: bool | Literal["gaussian", "loftq"] = Field(
        True, description="PEFT initialisation of the adapter."
    )
    target_modules: list[str] | str | None = Field(
        None,
        description="Modules to adapt: a list of names, or a regex matched against full "
        "module names. null: to_q, to_k, to_v, to_out.0.",
    )
    # loraflow additions
    alpha: float | None = Field(
        None,
        gt=0,
        description="loraflow: LoRA alpha; the update is scaled by alpha / rank. null: alpha "
        "= rank (Crynux's behaviour).",
    )
    text_encoder: TextEncoderLoraArgs | None = Field(
        None,
        description="loraflow: also train a LoRA on the text encoder(s); this turns off the "
        "caption-embedding cache for the run (latents stay cached). null: UNet only.",
    )


class TransformArgs(_Strict):
    center_crop: bool = Field(False, description="Center crop after resize; false: random crop.")
    random_flip: bool = Field(False, description="Random horizontal flip.")


class OutputArgs(_Strict):
    """loraflow addition: what a finished training publishes."""

    lora_formats: list[LoraFormat] = Field(
        default_factory=lambda: ["diffusers", "kohya"],
        min_length=1,
        description="LoRA file formats to publish: diffusers (PEFT keys, "
        "pytorch_lora_weights.safetensors) and kohya (lora_unet_* keys for "
        "ComfyUI / A1111).",
    )


class TaskDefinition(_Strict):
    """A whole fine-tuning task, as a Crynux node receives it."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, title="FinetuneLoraTaskArgs"
    )

    model: ModelArgs = Field(description="The pretrained base model.")
    dataset: DatasetArgs = Field(description="The training images and captions.")
    validation: ValidationArgs = Field(description="How validation images are made.")
    train_args: TrainArgs = Field(description="Optimisation, schedule and segment length.")
    lora: LoraArgs = Field(default_factory=LoraArgs, description="The LoRA adapter's shape.")
    transforms: TransformArgs = Field(
        default_factory=TransformArgs, description="Image augmentation."
    )
    dataloader_num_workers: int = Field(
        0, ge=0, description="Data loading subprocesses (honoured, unlike Crynux)."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Precision of the frozen weights and autocast."
    )
    seed: int = Field(0, description="Seeds every random draw; same task, same result.")
    checkpoint: str | None = Field(
        None, min_length=1, description="Checkpoint of the previous segment to resume from."
    )
    version: TaskVersion = Field(
        DEFAULT_DOCUMENT_VERSION,
        description="Task format version; older ones are migrated on load.",
    )
    # loraflow additions
    output: OutputArgs = Field(
        default_factory=OutputArgs, description="loraflow: what is published at the end."
    )

    # -- derived values (computed, never stored) --------------------------------------

    @property
    def lora_alpha(self) -> float:
        """The alpha actually used: the given one, or the rank as Crynux does."""
        return self.lora.alpha if self.lora.alpha is not None else float(self.lora.rank)

    @property
    def target_modules(self) -> list[str] | str:
        """The target modules actually used (list of names, or a regex)."""
        tm = self.lora.target_modules
        return list(DEFAULT_TARGET_MODULES) if tm is None else tm


def task_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a task document, generated from the model."""
    schema = TaskDefinition.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:loraflow:schema:finetune-task",
        **schema,
    }
