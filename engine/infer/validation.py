"""Validation images: the base pipeline with the LoRA, same inputs -> same pixels.

Prompts come from ``validation.prompt`` or, when it is null, from captions of the dataset
drawn by the task's seed. Image i is sampled from a CPU generator seeded by (seed, i), so
networks that compare validation images across nodes see the same pixels for the same
checkpoint on the same kind of device. The final validation also renders the base model
alone with the same prompts and seeds (``validation/base/``), so the card can show what
the LoRA changed.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from engine.errors import LoraflowError
from engine.infer.pipeline import load_pipeline, pipeline_from_base, scheduler_for_inference
from engine.lora.embeddings import load_trained_tokens
from engine.lora.weights import load_into_pipeline
from engine.model.loading import BaseModel, inspect_model, load_vae, training_device
from engine.model.precision import autocast, weight_dtype
from engine.store import storage
from engine.store.commit import read_checkpoint
from engine.task.definition import TaskDefinition
from engine.train.ema import published_source
from engine.train.seeding import generator

VALIDATION_DIR = "validation"  # under a segment's (or run's) output_dir
PROMPTS_FILE = "prompts.json"  # beside the images: prompts, step, seconds taken
BASE_DIR = "base"  # validation/base/: the same prompts and seeds, without the LoRA


@dataclass(frozen=True)
class CheckpointImages:
    """The final validation's PNG URLs: with the LoRA, and of the base model alone."""

    lora: list[str]
    base: list[str]


def validation_prompts(task: TaskDefinition, dataset: Any) -> list[str]:
    n = task.validation.num_images
    if task.validation.prompt is not None:
        return [task.validation.prompt] * n
    order = torch.randperm(len(dataset), generator=generator(task.seed, "validation_prompts"))
    picks = [int(order[i % len(dataset)]) for i in range(n)]
    return [(dataset.captions(i) or [""])[0] for i in picks]


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """PNG with the generation parameters in a text chunk, as AUTOMATIC1111 writes them."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def describe(prompt: str, steps: int, guidance: float, seed: int, size: int,
             extra: str = "") -> str:
    text = f"{prompt}\nSteps: {steps}, CFG scale: {guidance}, Seed: {seed}, Size: {size}x{size}"
    return text + (f", {extra}" if extra else "")


@torch.no_grad()
def render_validation(pipe: Any, task: TaskDefinition, prompts: list[str], device: torch.device,
                      dtype: torch.dtype) -> list[Image.Image]:
    """Render one image per prompt with per-image seeded CPU generators."""
    size = task.train_args.resolution
    images = []
    for i, prompt in enumerate(prompts):
        with autocast(device, dtype):
            out = pipe(
                prompt,
                num_inference_steps=task.validation.num_inference_steps,
                guidance_scale=task.validation.guidance_scale,
                height=size,
                width=size,
                generator=generator(task.seed, "validation", i),
                output_type="pil",
            )
        images.append(out.images[0])
    return images


def write_validation(
    output_dir: str, task: TaskDefinition, prompts: list[str], images: list[Image.Image],
    global_step: int, seconds: float | None = None,
) -> list[str]:
    """validation/NN.png (+ prompts.json) under output_dir; returns the PNG URLs."""
    urls = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=False)):
        params = describe(
            prompt, task.validation.num_inference_steps, task.validation.guidance_scale,
            task.seed, task.train_args.resolution, f"Image: {i}, Global step: {global_step}",
        )
        url = storage.join(output_dir, VALIDATION_DIR, f"{i:02d}.png")
        storage.write_bytes(url, png_bytes(image, params))
        urls.append(url)
    summary = {"global_step": global_step, "prompts": prompts,
               "images": [u.rsplit("/", 1)[-1] for u in urls], "seconds": seconds}
    storage.write_bytes(storage.join(output_dir, VALIDATION_DIR, PROMPTS_FILE),
                        json.dumps(summary, indent=2).encode())
    return urls


def write_base_images(output_dir: str, task: TaskDefinition, prompts: list[str],
                      images: list[Image.Image]) -> list[str]:
    """validation/base/NN.png under output_dir: the base model's images; returns the URLs."""
    urls = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        params = describe(
            prompt, task.validation.num_inference_steps, task.validation.guidance_scale,
            task.seed, task.train_args.resolution, f"Image: {i}, LoRA: none (base model)",
        )
        url = storage.join(output_dir, VALIDATION_DIR, BASE_DIR, f"{i:02d}.png")
        storage.write_bytes(url, png_bytes(image, params))
        urls.append(url)
    return urls


def measured_seconds(output_dir: str) -> float | None:
    """How long the validation written under ``output_dir`` took, if it was timed."""
    try:
        summary = json.loads(storage.read_bytes(
            storage.join(output_dir, VALIDATION_DIR, PROMPTS_FILE)))
        return float(summary["seconds"])
    except (FileNotFoundError, KeyError, TypeError, ValueError, LoraflowError):
        return None


def unet_passes(task: TaskDefinition) -> int:
    """Batch-1 UNet forwards that rendering the validation images makes (2 with CFG)."""
    cfg = 2 if task.validation.guidance_scale > 1 else 1
    return task.validation.num_images * task.validation.num_inference_steps * cfg


def validate_in_segment(task: TaskDefinition, base: BaseModel, prediction_type: str,
                        dataset: Any, output_dir: str, global_step: int) -> list[str]:
    """Validation images from the adapted modules in memory, timed for the next segment."""
    scheduler = scheduler_for_inference(base.location, task.model.revision, prediction_type)
    pipe = pipeline_from_base(base, scheduler)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.monotonic()
    prompts = validation_prompts(task, dataset)
    images = render_validation(pipe, task, prompts, base.device, base.dtype)
    return write_validation(output_dir, task, prompts, images, global_step,
                            seconds=time.monotonic() - t0)


def validate_checkpoint(task: TaskDefinition, checkpoint_url: str, output_dir: str,
                        dataset: Any) -> CheckpointImages:
    """Validation images from the base pipeline with the checkpoint's LoRA *file* loaded.

    Unlike the in-segment validation (which reuses the adapted UNet in memory), this goes
    through ``load_lora_weights`` on a fresh pipeline: what a user of the file gets. The
    same pipeline renders the same prompts and seeds first without the LoRA (the base).
    A full fine-tune (``training_type: "full"``) has no LoRA file: see
    :func:`validate_full_checkpoint`.
    """
    if task.training_type == "full":
        return validate_full_checkpoint(task, checkpoint_url, output_dir, dataset)
    loaded = read_checkpoint(checkpoint_url)
    device = training_device()
    dtype = weight_dtype(task.mixed_precision, device)
    pipe, location, _ = load_pipeline(task.model, dtype, safety_checker=False)
    pipe.to(device)
    prediction = (task.train_args.prediction_type
                  or pipe.scheduler.config.get("prediction_type", "epsilon"))
    pipe.scheduler = scheduler_for_inference(location, task.model.revision, prediction)
    if task.model.vae is not None:
        pipe.vae = load_vae(task, location, dtype, None).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = validation_prompts(task, dataset)
    base = write_base_images(output_dir, task, prompts,
                             render_validation(pipe, task, prompts, device, dtype))
    # from the file (its alpha metadata), the one published: the EMA when it is
    load_into_pipeline(pipe, loaded.files[published_source(task)])
    load_trained_tokens(pipe, task, inspect_model(task.model)[1], loaded.files)  # lora.new_tokens
    images = render_validation(pipe, task, prompts, device, dtype)
    lora = write_validation(output_dir, task, prompts, images, loaded.global_step)
    return CheckpointImages(lora=lora, base=base)


def validate_full_checkpoint(task: TaskDefinition, checkpoint_url: str, output_dir: str,
                             dataset: Any) -> CheckpointImages:
    """A full fine-tune's validation: the base model, then the same modules holding the
    checkpoint's trained UNet (and text encoders), same prompts and seeds.

    The weights come from the file the published model is made of (the EMA when it is
    the one published), into a freshly loaded model with the task's component overrides,
    as :func:`engine.model.full_export.publish_full_model` builds it. ``CheckpointImages
    .lora`` then holds the fine-tuned model's images.
    """
    from engine.model.full_export import published_weights_file, put_trained_weights
    from engine.model.loading import load_base_model

    loaded = read_checkpoint(checkpoint_url)
    device = training_device()
    base = load_base_model(task, device)
    base.unet.to(device)
    prediction = task.train_args.prediction_type or base.noise_scheduler.config.prediction_type
    pipe = pipeline_from_base(
        base, scheduler_for_inference(base.location, task.model.revision, prediction)
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = validation_prompts(task, dataset)
    base_urls = write_base_images(output_dir, task, prompts,
                                  render_validation(pipe, task, prompts, device, base.dtype))
    put_trained_weights(base, loaded.files[published_weights_file(task)])
    images = render_validation(pipe, task, prompts, device, base.dtype)
    trained = write_validation(output_dir, task, prompts, images, loaded.global_step)
    return CheckpointImages(lora=trained, base=base_urls)
