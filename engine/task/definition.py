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

import re
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    """Base for every section: unknown keys are errors, values are re-validated on edit.

    ``_omit_when_default`` names fields added after identities were first recorded: at
    their default they are left out of :meth:`stable_dump`, so a checkpoint, a prepared
    dataset's address or a published file made before the field existed still matches.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _omit_when_default: ClassVar[frozenset[str]] = frozenset()

    def stable_dump(self, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        """``model_dump`` without the newer fields that are at their default."""
        out = self.model_dump(mode=mode)
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if name in self._omit_when_default and value == info.get_default(
                call_default_factory=True
            ):
                del out[name]
            elif isinstance(value, _Strict):
                out[name] = value.stable_dump(mode)
            elif isinstance(value, list) and any(isinstance(v, _Strict) for v in value):
                out[name] = [v.stable_dump(mode) for v in value]
        return out


ComponentDtype = Literal["fp32", "fp16", "bf16"]


class ModelArgs(_Strict):
    _omit_when_default = frozenset({
        "unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
        "unet_dtype", "vae_dtype", "text_encoder_dtype", "text_encoder_2_dtype",
    })

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
    unet: str | None = Field(
        None, min_length=1,
        description="loraflow: a UNet (Hub ID or local diffusers folder with config.json) to "
        "use instead of the model's; it must be of the model's family.",
    )
    text_encoder: str | None = Field(
        None, min_length=1,
        description="loraflow: a text encoder (Hub ID or local transformers folder) instead of "
        "the model's; it must be of the model's family (refused otherwise, before loading).",
    )
    text_encoder_2: str | None = Field(
        None, min_length=1, description="loraflow: SDXL only: the second text encoder."
    )
    tokenizer: str | None = Field(
        None, min_length=1, description="loraflow: a tokenizer folder or ID instead of the model's."
    )
    tokenizer_2: str | None = Field(
        None, min_length=1, description="loraflow: SDXL only: the second tokenizer."
    )
    unet_dtype: ComponentDtype | None = Field(
        None, description="loraflow: dtype of the frozen UNet; null: mixed_precision's."
    )
    vae_dtype: ComponentDtype | None = Field(
        None, description="loraflow: dtype of the VAE; null: as mixed_precision and model.vae "
        "say (fp32 for the model's own VAE under fp16).",
    )
    text_encoder_dtype: ComponentDtype | None = Field(
        None, description="loraflow: dtype of the frozen text encoder; null: mixed_precision's."
    )
    text_encoder_2_dtype: ComponentDtype | None = Field(
        None, description="loraflow: SDXL only: dtype of the second text encoder."
    )


FilterOp = Literal["==", "!=", ">", ">=", "<", "<=", "in", "not_in"]


class FilterArgs(_Strict):
    """loraflow addition: keep only the records whose metadata field passes a comparison.

    Declared as data and never evaluated as code: ``{"field": "aesthetic_score", "op": ">",
    "value": 4.5}``. ``field`` is a column of a tabular source, or a key of a webdataset
    sample's ``.json`` (dots reach into nested objects: ``"meta.width"``).
    """

    field: str = Field(min_length=1, description="Column or JSON key (dots for nesting).")
    op: FilterOp = Field(description="Comparison: ==, !=, >, >=, <, <=, in, not_in.")
    value: float | int | str | bool | list[float | int | str | bool] = Field(
        description="What the field is compared with (a list for in / not_in)."
    )
    missing: Literal["error", "exclude", "include"] = Field(
        "error",
        description="A record without the field: an error naming it (default), left out, "
        "or kept.",
    )


class CaptionArgs(_Strict):
    """loraflow addition: how captions are changed each time a sample is used.

    Every random choice is drawn from the sample's own seeded generator, so a resumed run
    makes the same choices. Order: pick one caption, shuffle its tags, drop it, then add
    the prefix and suffix (a dropped caption stays empty: that is what the unconditional
    case of classifier-free guidance needs).
    """

    prefix: str | None = Field(
        None, description="Text put before every caption as written, e.g. 'sks, '."
    )
    suffix: str | None = Field(None, description="Text put after every caption as written.")
    dropout: float = Field(
        0.0, ge=0, le=1, description="Probability that a sample trains with an empty caption."
    )
    shuffle_tags: bool = Field(
        False, description="Shuffle the caption's tags (split on tag_separator) each use."
    )
    keep_tokens: int = Field(
        0, ge=0, description="Leading tags that stay in place when tags are shuffled."
    )
    tag_separator: str = Field(",", min_length=1, description="What separates tags.")


class BucketArgs(_Strict):
    """loraflow addition: aspect-ratio buckets (set to turn them on).

    Each image goes to the bucket nearest its aspect ratio, is resized to cover it and
    cropped (center or random, as ``transforms.center_crop`` says); a batch holds one
    bucket. Without ``ratios`` or ``sizes`` the buckets are every width x height with
    sides multiples of ``step``, area at most resolution^2 and aspect ratio at most
    ``max_aspect_ratio``.
    """

    step: int = Field(
        64, ge=8, multiple_of=8, description="Bucket sides are multiples of this (pixels)."
    )
    max_aspect_ratio: float = Field(
        2.0, ge=1, le=16, description="Widest and tallest bucket allowed (long / short side)."
    )
    ratios: list[float | str] | None = Field(
        None,
        min_length=1,
        description="Aspect ratios (width / height) to make buckets of, as numbers or "
        "'W:H' strings, e.g. ['1:1', '3:2', '2:3', '16:9']; each bucket has area about "
        "resolution^2 with sides multiples of step.",
    )
    sizes: list[tuple[int, int]] | None = Field(
        None, min_length=1, description="Explicit buckets as [width, height] pairs in pixels."
    )

    @model_validator(mode="after")
    def _one_way(self) -> BucketArgs:
        if self.ratios is not None and self.sizes is not None:
            raise ValueError("give ratios or sizes, not both")
        for i, (width, height) in enumerate(self.sizes or []):
            if width <= 0 or height <= 0:
                raise ValueError(f"sizes[{i}] is {width}x{height}: both sides must be > 0")
        for i, ratio in enumerate(self.ratios or []):
            _check_ratio(ratio, i)
        return self


def _check_ratio(ratio: float | str, index: int) -> None:
    if isinstance(ratio, str):
        parts = ratio.split(":")
        ok = len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts)
        if not ok:
            raise ValueError(f"ratios[{index}] is {ratio!r}: write W:H with two positive whole "
                             "numbers, e.g. '16:9', or a number > 0")
    elif not ratio > 0:
        raise ValueError(f"ratios[{index}] is {ratio}: an aspect ratio must be > 0")


class DatasetArgs(_Strict):
    """One data source (a "subset"): where its images and captions are, and how it trains."""

    _omit_when_default = frozenset({
        "shards", "filters", "caption_extension", "repeats", "loss_weight", "captions",
        "resolution", "buckets", "masks", "mask_column", "mask_min_weight",
    })

    url: str | None = Field(
        None,
        min_length=1,
        max_length=2083,
        description="URL (http(s) or any fsspec URL) of a zip or tar(.gz/.bz2/.xz) archive "
        "holding the dataset. Exactly one of url, name and shards is set.",
    )
    name: str | None = Field(
        None,
        min_length=1,
        description="Hub dataset ID or local path: an image folder (with metadata.jsonl/csv, "
        "or kohya-style same-named .txt captions, NN_name repeat folders), parquet/csv/json/"
        "arrow files, or a datasets save_to_disk folder. loraflow/demo-shapes names a small "
        "demo set built locally.",
    )
    config_name: str | None = Field(None, description="Dataset configuration, if it has several.")
    image_column: str = Field("image", description="Column holding the image.")
    caption_column: str = Field(
        "text", description="Column holding the caption; a list of captions means pick one."
    )
    # loraflow additions
    shards: list[str] | None = Field(
        None,
        min_length=1,
        description="loraflow: webdataset tar shards (NNNN.jpg + NNNN.txt + optional NNNN.json "
        "per sample), local or fsspec URLs, with brace patterns: "
        "'s3://bucket/shards/{0000..0099}.tar'. Streamed: only an index is stored locally.",
    )
    filters: list[FilterArgs] = Field(
        default_factory=list,
        description="loraflow: keep only records passing every filter (declared as data).",
    )
    caption_extension: str = Field(
        ".txt",
        pattern=r"^\.[A-Za-z0-9_]+$",
        description="loraflow: extension of same-named caption files in an image folder.",
    )
    repeats: int = Field(
        1, ge=1, description="loraflow: times each image of this subset is used per epoch."
    )
    loss_weight: float = Field(
        1.0, gt=0, description="loraflow: weight of this subset's samples in the loss."
    )
    captions: CaptionArgs = Field(
        default_factory=CaptionArgs, description="loraflow: caption prefix, dropout, shuffle."
    )
    resolution: int | None = Field(
        None, ge=8, description="loraflow: this subset's training size; null: train_args'."
    )
    buckets: BucketArgs | None = Field(
        None, description="loraflow: this subset's buckets; null: train_args.buckets."
    )
    masks: Literal["none", "beside"] = Field(
        "none",
        description="loraflow: 'beside': each image name.ext has a loss mask name_mask.png (any "
        "image extension) beside it (image and kohya folders); white trains, black is ignored.",
    )
    mask_column: str | None = Field(
        None, min_length=1,
        description="loraflow: column holding each row's loss mask (an image, or a path like the "
        "image column's); instead of masks 'beside'.",
    )
    mask_min_weight: float = Field(
        0.0, ge=0, le=1,
        description="loraflow: loss weight of a masked-out (black) pixel; 0 ignores it.",
    )

    @field_validator("filters", mode="before")
    @classmethod
    def _filters_are_data(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, str) or (
                isinstance(item, (list, tuple)) and any(isinstance(v, str) and "lambda" in v
                                                        for v in item)
            ):
                raise ValueError(
                    f"filters[{i}] is code ({str(item)[:60]!r}); filters are data and never "
                    'evaluated: write {"field": "aesthetic_score", "op": ">", "value": 4.5}'
                )
        return value


class ValidationArgs(_Strict):
    _omit_when_default = frozenset({"validation_steps", "prompts_file", "dataset_file"})

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
    validation_steps: int | None = Field(
        None,
        ge=1,
        description="loraflow: also validate the committed checkpoint every this many "
        "optimizer steps (images and a held-out loss under output_dir/validation/step-N/), "
        "in a separate task outside the segments' time budget. Needs "
        "train_args.checkpointing_steps dividing it. null: only at the end.",
    )
    prompts_file: str | None = Field(
        None,
        min_length=1,
        description="loraflow: a text file (path or URL), one validation prompt per line; "
        "instead of prompt.",
    )
    dataset_file: str | None = Field(
        None,
        min_length=1,
        description="loraflow: a validation set (csv, json, jsonl, parquet, arrow) with a "
        "prompt column and optional negative_prompt, seed, width/height (or size), steps, "
        "guidance_scale and image (relative to the file: the held-out loss is computed on "
        "these images and prompts); instead of prompt.",
    )


class LRSchedulerArgs(_Strict):
    lr_scheduler: LrSchedulerName = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(500, ge=0, description="Linear warmup steps.")


class AdamOptimizerArgs(_Strict):
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    epsilon: float = Field(1e-8, gt=0)


class AdamW8bitArgs(_Strict):
    """loraflow addition: bitsandbytes' AdamW8bit: both moments kept in 8 bits (blockwise
    quantized), about a quarter of AdamW's optimizer memory. Betas, epsilon and weight
    decay are ``train_args.adam_args``. Needs the ``loraflow[bnb]`` extra; a device
    bitsandbytes cannot run it on is refused before any model is loaded."""

    min_8bit_size: int = Field(
        4096, ge=1, description="Weights with fewer elements keep 32-bit moments."
    )


class ProdigyArgs(_Strict):
    """loraflow addition: Prodigy (prodigyopt), which estimates the step size itself: set
    ``learning_rate`` to 1.0 (a multiplier of its estimate) and use a constant schedule.
    Betas, epsilon and weight decay are ``train_args.adam_args``. Needs
    ``loraflow[optimizers]``."""

    d0: float = Field(1e-6, gt=0, description="Initial step-size estimate.")
    d_coef: float = Field(1.0, gt=0, description="Multiplier of the estimated step size.")
    growth_rate: float | None = Field(
        None, gt=1, description="Most the estimate may grow per step (factor); null: no limit."
    )
    beta3: float | None = Field(
        None, ge=0, lt=1, description="Step-size estimate decay; null: sqrt(beta2)."
    )
    use_bias_correction: bool = Field(False, description="Adam's bias correction.")
    safeguard_warmup: bool = Field(False, description="Keep the estimate small during warmup.")
    decouple: bool = Field(True, description="AdamW-style decoupled weight decay.")


class AdafactorArgs(_Strict):
    """loraflow addition: transformers' Adafactor with a given learning rate (factored
    second moments: the least optimizer memory). Its own options; adam_args is unused."""

    scale_parameter: bool = Field(False, description="Scale the lr by each weight's RMS.")
    clip_threshold: float = Field(1.0, gt=0, description="Update clipping threshold.")
    decay_rate: float = Field(-0.8, lt=0, description="Second-moment decay exponent.")
    beta1: float | None = Field(
        None, ge=0, lt=1, description="First-moment decay; null: none kept (less memory)."
    )
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    eps1: float = Field(1e-30, gt=0, description="Regulariser of the squared gradient.")
    eps2: float = Field(1e-3, gt=0, description="Regulariser of the parameter scale.")


class ScheduleFreeAdamWArgs(_Strict):
    """loraflow addition: schedule-free AdamW (schedulefree): no lr decay needed (use a
    constant schedule); the weights published and checkpointed are its averaged (eval)
    weights. Betas, epsilon and weight decay are ``train_args.adam_args``. Needs
    ``loraflow[optimizers]``."""

    warmup_steps: int = Field(0, ge=0, description="Its own linear lr warmup, in steps.")
    r: float = Field(0.0, ge=0, description="Polynomial weighting power of the average.")
    weight_lr_power: float = Field(
        2.0, ge=0, description="How much a step's lr weighs in the average."
    )


OptimizerName = Literal["adamw", "adamw8bit", "prodigy", "adafactor", "schedule_free_adamw"]


class OptimizerArgs(_Strict):
    """loraflow addition: the optimizer, by name, and that optimizer's own options in the
    section of the same name (only that one may be given; left out: its defaults).
    ``adamw`` (the default, torch's) has no section: ``train_args.adam_args`` is its."""

    name: OptimizerName = Field(
        "adamw", description="adamw, adamw8bit, prodigy, adafactor or schedule_free_adamw."
    )
    adamw8bit: AdamW8bitArgs | None = Field(None, description="Options of adamw8bit.")
    prodigy: ProdigyArgs | None = Field(None, description="Options of prodigy.")
    adafactor: AdafactorArgs | None = Field(None, description="Options of adafactor.")
    schedule_free_adamw: ScheduleFreeAdamWArgs | None = Field(
        None, description="Options of schedule_free_adamw."
    )

    @model_validator(mode="after")
    def _only_the_named_section(self) -> OptimizerArgs:
        for section in ("adamw8bit", "prodigy", "adafactor", "schedule_free_adamw"):
            if getattr(self, section) is not None and section != self.name:
                raise ValueError(f"options for {section} are given but the optimizer is "
                                 f"{self.name!r}: set name to {section!r} or drop them")
        return self

    @property
    def options(self) -> _Strict | None:
        """The chosen optimizer's options (its section, or its defaults); None for adamw."""
        classes = {"adamw8bit": AdamW8bitArgs, "prodigy": ProdigyArgs,
                   "adafactor": AdafactorArgs, "schedule_free_adamw": ScheduleFreeAdamWArgs}
        if self.name not in classes:
            return None
        return getattr(self, self.name) or classes[self.name]()

class EmaArgs(_Strict):
    """loraflow addition: an exponential moving average of the trained weights, kept in
    every checkpoint. After step s: at s <= start_step it is the weights themselves, then
    every ``update_every`` steps ema = decay * ema + (1 - decay) * weights."""

    decay: float = Field(0.999, gt=0, lt=1, description="Weight of the average per update.")
    start_step: int = Field(0, ge=0, description="Global step the averaging starts after.")
    update_every: int = Field(1, ge=1, description="Update the average every this many steps.")
    publish: Literal["ema", "raw"] = Field(
        "ema",
        description="Which weights the published files (pytorch_lora_weights.safetensors, "
        "the kohya file) hold: the average or the last step's raw weights.",
    )
    publish_both: bool = Field(
        False,
        description="Also publish the other weights, in files named with _raw or _ema "
        "(pytorch_lora_weights_raw.safetensors, ...).",
    )


class TrainArgs(_Strict):
    _omit_when_default = frozenset({"optimizer", "ema", "buckets", "cached_crops",
                                    "deterministic", "compile", "digest_steps"})

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
    digest_steps: int | None = Field(
        None,
        ge=1,
        description="loraflow: record a digest (the step's loss, a sha256 of the trained "
        "weights and of the optimizer state) every this many optimizer steps in each "
        "checkpoint's manifest, for `loraflow verify`; in-segment checkpoints and the "
        "segment's first and last step always get one. null: about 16 per segment.",
    )
    cached_crops: int | None = Field(
        None,
        ge=1,
        le=64,
        description="loraflow: with random crop, crop each image at this many positions of "
        "its own (drawn once per image from the seed) and pick one per use, so the latents "
        "can be cached (this many per orientation). Unlike plain random crop, which draws "
        "a new position each use, an image is seen at these positions only. Same result "
        "with the cache on or off. null: a new random crop each use, encoded live.",
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
    deterministic: bool = Field(
        True,
        description="loraflow: on a GPU, only deterministic kernels (deterministic algorithms, "
        "cuDNN without autotuning, a fixed cuBLAS workspace, no TF32), so k segments equal one "
        "run bit for bit. false: the fastest kernels; runs may differ in the last bits. No "
        "effect on a CPU.",
    )
    compile: bool = Field(
        False,
        description="loraflow: compile the UNet's blocks with torch.compile (faster steps on a "
        "GPU after a compile of a minute or more per segment). Results differ from eager "
        "mode in the last bits.",
    )
    buckets: BucketArgs | None = Field(
        None,
        description="loraflow: aspect-ratio bucketing of every subset (a subset may set its "
        "own). null: every image is resized and cropped to one square of resolution.",
    )
    optimizer: OptimizerArgs = Field(
        default_factory=OptimizerArgs,
        description="loraflow: the optimizer and its own options, by name: adamw (default), "
        "adamw8bit, prodigy, adafactor, schedule_free_adamw.",
    )
    ema: EmaArgs | None = Field(
        None,
        description="loraflow: keep an exponential moving average of the trained weights "
        "and publish it (or the raw weights, or both). null: no average.",
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


AdapterType = Literal["lora", "loha", "lokr", "dora"]
#: The UNet convolutions adapted when ``lora.conv`` is set without target_modules (LoCon:
#: the resnets' and samplers' convolutions, as kohya's LoCon / LyCORIS adapt them).
DEFAULT_CONV_TARGET_MODULES: tuple[str, ...] = (
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"
)


class ConvLoraArgs(_Strict):
    """loraflow addition: adapt the UNet's convolutions too (LoCon), at their own rank."""

    rank: int = Field(4, ge=1, le=1024, description="Rank of the convolution adapters.")
    alpha: float | None = Field(None, gt=0, description="Their alpha; null: alpha = rank.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Convolution modules to adapt; null: conv1, conv2, conv_shortcut, "
        "downsamplers.0.conv, upsamplers.0.conv.",
    )


class NewTokenArgs(_Strict):
    """loraflow addition: a new token (pivotal tuning): added to the tokenizer(s), its
    embedding initialised from existing tokens and trained with the LoRA.

    The initialisation is data, never code: ``init_pattern`` is a regular expression
    (Python ``re.search``) over the vocabulary's token strings (CLIP marks a word's end
    with ``</w>``: ``"^dog</w>$"``), ``init_words`` a list of words; either way the new
    embedding is the mean of the chosen tokens' embeddings (per text encoder).
    """

    token: str = Field(
        min_length=1, max_length=64, pattern=r"^[^\s.,]+$",
        description="The new token as captions write it, e.g. '<sks>' or '[fernando]' (no "
        "spaces, dots or commas); refused if the tokenizer already has it.",
    )
    init_pattern: str | None = Field(
        None, min_length=1, description="Regex over the vocabulary; the mean of the matching "
        "tokens' embeddings. Exactly one of init_pattern and init_words is set.",
    )
    init_words: list[str] | None = Field(
        None, min_length=1, description="Words whose tokens' mean embedding starts the token.",
    )
    num_vectors: int = Field(
        1, ge=1, le=32, description="Embedding vectors of the token; above 1 the tokenizer gets "
        "token, token_1, ... (as diffusers' textual inversion), and captions keep writing token.",
    )
    learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of this token's embeddings; null: "
        "train_args.learning_rate.",
    )

    @model_validator(mode="after")
    def _one_init(self) -> NewTokenArgs:
        if (self.init_pattern is None) == (self.init_words is None):
            raise ValueError(f"token {self.token!r}: set exactly one of init_pattern and "
                             "init_words")
        if self.init_pattern is not None:
            try:
                re.compile(self.init_pattern)
            except re.error as exc:
                raise ValueError(f"token {self.token!r}: init_pattern {self.init_pattern!r} "
                                 f"is not a regular expression: {exc}") from None
        return self

    @property
    def vector_names(self) -> list[str]:
        """The tokenizer entries of this token: token, token_1, ... (num_vectors of them)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]


class LoraArgs(_Strict):
    _omit_when_default = frozenset({"type", "conv", "lokr_factor", "new_tokens"})

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
    type: AdapterType = Field(
        "lora",
        description="loraflow: the adapter: lora, loha (LyCORIS Hadamard product), lokr "
        "(LyCORIS Kronecker product) or dora (weight-decomposed LoRA), trained through PEFT, "
        "on the UNet and the text encoders alike. loha and lokr publish the LyCORIS (kohya) "
        "file only: diffusers does not load them.",
    )
    conv: ConvLoraArgs | None = Field(
        None,
        description="loraflow: also adapt the UNet's convolutions (LoCon), with their own "
        "rank and alpha. null: only lora.target_modules.",
    )
    lokr_factor: int = Field(
        -1,
        description="loraflow: LoKr's Kronecker factor (PEFT decompose_factor); -1: the "
        "factor nearest the square root of each dimension.",
    )
    new_tokens: list[NewTokenArgs] = Field(
        default_factory=list,
        description="loraflow: new tokens whose embeddings train with the LoRA (both text "
        "encoders for SDXL), published in the kohya file (bundle_emb) and as "
        "textual-inversion files; captions are then encoded every step (no text cache).",
    )

    @model_validator(mode="after")
    def _distinct_tokens(self) -> LoraArgs:
        names = [n for t in self.new_tokens for n in t.vector_names]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"lora.new_tokens names {twice} more than once")
        return self


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


class FullFinetuneArgs(_Strict):
    """loraflow addition: what a full fine-tune (``training_type: "full"``) trains."""

    train_text_encoder: bool = Field(
        False,
        description="Also train every weight of the text encoder(s) (both for SDXL); this "
        "turns off the caption-embedding cache for the run.",
    )
    text_encoder_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the text encoder(s); null: the UNet's."
    )


class CaptioningArgs(_Strict):
    """loraflow: caption the images of the dataset before training (the caption step).

    The captions are cached by (image sha256, backend, model, revision, prompt) and written
    as an editable ``metadata.jsonl`` beside the prepared dataset.
    """

    backend: Literal["transformers", "openai"] = Field(
        description="'transformers': a local vision-language model (BLIP, GIT, Florence-2, "
        "LLaVA/Qwen2-VL class); 'openai': an OpenAI-compatible chat-completions API with "
        "image input (vLLM, Ollama, LM Studio, hosted gateways).",
    )
    model: str = Field(min_length=1, description="Model id (a Hub id or folder, or the API's "
                       "model name).")
    revision: str = Field("main", description="Branch, tag or commit of a local model.")
    base_url: str | None = Field(
        None, description="Base URL of the chat-completions API (backend 'openai'), e.g. "
        "http://localhost:11434/v1.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (never the key).",
    )
    prompt: str = Field(
        "Describe this image in one sentence, as a caption for training a text-to-image "
        "model.",
        min_length=1,
        description="Instruction to the model; {trigger} and {class_name} are filled in.",
    )
    trigger: str | None = Field(None, description="Trigger word, e.g. 'sks'; {trigger}.")
    class_name: str | None = Field(None, description="Class of the subject, e.g. 'dog'.")
    mode: Literal["missing", "all", "prepend", "append"] = Field(
        "missing",
        description="'missing': caption images without one; 'all': replace every caption; "
        "'prepend'/'append': put the generated text before/after the existing caption.",
    )
    max_length: int = Field(
        77, ge=1, le=1024, description="Most new tokens the model may generate."
    )
    strip_phrases: list[str] = Field(
        default_factory=lambda: ["The image shows", "This image shows", "The image depicts",
                                 "This is an image of", "An image of"],
        description="Leading phrases removed from answers (case-insensitive).",
    )
    lowercase: bool = Field(False, description="Lower-case the captions.")
    caption_template: str = Field(
        "{caption}", description="How a caption is written: {caption}, {trigger}, "
        "{class_name}; e.g. '{trigger} {class_name}, {caption}'.",
    )
    on_empty: Literal["keep_uncaptioned", "error"] = Field(
        "keep_uncaptioned",
        description="An empty or refused answer: keep the image uncaptioned (with a reason) "
        "or stop with an error.",
    )
    batch_size: int = Field(8, ge=1, description="Images per model call (local backend).")
    timeout_seconds: float = Field(60.0, gt=0, description="Per request (API backend).")
    max_retries: int = Field(3, ge=0, le=20, description="Retries of a failed API request.")


class DreamBoothArgs(_Strict):
    """loraflow: DreamBooth with prior preservation.

    The task's subsets are the instance images (their captions, or a caption prefix, hold
    the identifier, e.g. 'sks dog'); a class subset of ``num_class_images`` images captioned
    ``class_prompt`` trains beside them with loss weight ``prior_loss_weight``, so the
    model keeps what the class looks like. The class images are taken from
    ``class_data_dir`` and/or generated by the base model itself (cached, resumable,
    deterministic: a re-run generates nothing).
    """

    class_prompt: str = Field(min_length=1, description="Prompt of the class, e.g. 'a dog'.")
    num_class_images: int = Field(
        100, ge=1, le=100_000, description="Class images trained on (diffusers' default: 100)."
    )
    prior_loss_weight: float = Field(
        1.0, gt=0, description="Loss weight of the class images' samples."
    )
    class_data_dir: str | None = Field(
        None, min_length=1,
        description="A folder (path or fsspec URL) of class images used first, in name "
        "order; what it lacks is generated (unless generate is false).",
    )
    generate: bool = Field(
        True, description="Generate the class images class_data_dir does not provide.",
    )
    seed: int | None = Field(
        None, description="Seed of the generation; null: the task's seed."
    )
    num_inference_steps: int = Field(25, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, le=100, description="Classifier-free guidance.")
    negative_prompt: str | None = Field(None, description="Negative prompt of the generation.")
    resolution: int | None = Field(
        None, ge=8, multiple_of=8,
        description="Side of the generated (square) images; null: train_args.resolution.",
    )
    batch_size: int = Field(4, ge=1, le=64, description="Images generated per pipeline call.")

    @model_validator(mode="after")
    def _has_a_source(self) -> DreamBoothArgs:
        if not self.generate and self.class_data_dir is None:
            raise ValueError("generate is false and no class_data_dir is given: the class "
                             "images must come from somewhere")
        return self


class TaskDefinition(_Strict):
    """A whole fine-tuning task, as a Crynux node receives it."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, title="FinetuneLoraTaskArgs"
    )

    _omit_when_default = frozenset({
        "datasets", "training_type", "full_finetune", "captioning", "dreambooth",
    })

    model: ModelArgs = Field(description="The pretrained base model.")
    dataset: DatasetArgs | None = Field(
        None,
        description="The training images and captions. Exactly one of dataset and datasets "
        "is set.",
    )
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
    datasets: list[DatasetArgs] | None = Field(
        None,
        min_length=1,
        description="loraflow: several subsets trained together, each with its own repeats, "
        "loss weight, captions and resolution; instead of dataset.",
    )

    training_type: Literal["lora", "full"] = Field(
        "lora",
        description="loraflow: 'lora' trains a LoRA adapter (Crynux's task); 'full' trains "
        "every UNet weight (see full_finetune) and publishes a whole model.",
    )
    full_finetune: FullFinetuneArgs = Field(
        default_factory=FullFinetuneArgs,
        description="loraflow: settings of training_type 'full'.",
    )
    captioning: CaptioningArgs | None = Field(
        None, description="loraflow: caption the images before training (see CaptioningArgs).",
    )
    dreambooth: DreamBoothArgs | None = Field(
        None, description="loraflow: DreamBooth prior preservation: a class subset of "
        "generated or given images (see DreamBoothArgs). null: off.",
    )

    @model_validator(mode="after")
    def _full_or_lora(self) -> TaskDefinition:
        if self.training_type == "full" and self.lora.new_tokens:
            raise ValueError("lora.new_tokens is for training_type 'lora'")
        if self.training_type == "full" and self.lora.text_encoder is not None:
            raise ValueError("lora.text_encoder is for training_type 'lora'; a full fine-tune "
                             "trains the text encoder with full_finetune.train_text_encoder")
        if self.training_type == "lora" and self.full_finetune != FullFinetuneArgs():
            raise ValueError("full_finetune is set but training_type is 'lora': set "
                             "training_type to 'full' or remove full_finetune")
        return self

    @model_validator(mode="after")
    def _cached_crops_need_random_crop(self) -> TaskDefinition:
        if self.train_args.cached_crops is not None and self.transforms.center_crop:
            raise ValueError("train_args.cached_crops is for random crop; with "
                             "transforms.center_crop the one center crop is cached already")
        return self

    @model_validator(mode="after")
    def _one_dataset_section(self) -> TaskDefinition:
        if (self.dataset is None) == (self.datasets is None):
            raise ValueError("set exactly one of 'dataset' (one source) and 'datasets' "
                             "(several subsets)")
        return self

    # -- derived values (computed, never stored) --------------------------------------

    @property
    def subsets(self) -> list[DatasetArgs]:
        """The data sources: ``datasets``, or the one ``dataset`` (a Crynux task)."""
        return list(self.datasets) if self.datasets is not None else [self.dataset]

    @property
    def trains_text_encoder(self) -> bool:
        """Text encoder weights learn (a LoRA on them, a full fine-tune of them, or new
        tokens' embeddings): captions are then encoded every step, with gradients, never
        from the cache."""
        if self.training_type == "full":
            return self.full_finetune.train_text_encoder
        return self.lora.text_encoder is not None or bool(self.lora.new_tokens)

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
