"""Validating a committed checkpoint at a step: images and the held-out loss, per adapter.

``validation.validation_steps`` asks for this every N optimizer steps. It runs outside
the segments (a separate Prefect task, maybe on another worker while the next segment
trains), from the checkpoint committed at that step: the segment's budget never pays for
it. Everything lands in ``<output_dir>/validation/step-N/``:

* ``NN.png``: the validation set rendered with the checkpoint's adapter (``raw``);
* ``ema/NN.png``: the same with the checkpoint's EMA adapter, when it holds one;
* ``prompts.json``: what each image is (prompt, seed, size, steps, guidance);
* ``loss.json``, written last: the held-out loss of each adapter
  (:mod:`engine.infer.validation_loss`) and the sha256 of the LoRA file it came from. A
  step whose ``loss.json`` names the same file is found again, not recomputed.

The adapter is restored into the base model in memory from the checkpoint's verified
bytes; the same modules render the images and compute the loss, so one model load serves
both (and both adapters).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.infer.pipeline import pipeline_from_base, scheduler_for_inference
from engine.infer.validation import VALIDATION_DIR, png_bytes
from engine.infer.validation_loss import held_out_set, validation_loss
from engine.infer.validation_set import ValidationItem, validation_items
from engine.lora.weights import LORA_FILE, LoraFileError, restore_lora
from engine.model.full_export import put_trained_weights
from engine.model.loading import add_lora_adapters, load_base_model, training_device
from engine.model.precision import autocast
from engine.store import storage
from engine.store.commit import read_checkpoint, read_manifest
from engine.task.definition import TaskDefinition
from engine.train.full_finetune import WEIGHTS_FILE
from engine.train.seeding import generator

log = logging.getLogger(__name__)

LOSS_FILE = "loss.json"  # written last: the step's validation is complete once it exists
STEP_PROMPTS_FILE = "prompts.json"
RAW, EMA = "raw", "ema"


@dataclass(frozen=True)
class StepValidation:
    """One validated step: its folder, each adapter's image URLs and loss."""

    global_step: int
    folder: str
    images: dict[str, list[str]]  # adapter ("raw", "ema") -> PNG URLs, in set order
    loss: dict[str, float]  # adapter -> held-out loss
    source: str  # which held-out set: "validation_dataset" or "training_subset"
    prompts: list[str] = field(default_factory=list)


def step_dir(output_dir: str, global_step: int) -> str:
    """``<output_dir>/validation/step-N``."""
    return storage.join(output_dir, VALIDATION_DIR, f"step-{global_step}")


def is_validation_step(task: TaskDefinition, global_step: int) -> bool:
    every = task.validation.validation_steps
    return bool(every) and global_step > 0 and global_step % every == 0


def adapter_files(files: dict[str, bytes], weights_file: str = LORA_FILE) -> dict[str, bytes]:
    """The adapters a checkpoint holds: ``raw`` (its LoRA file, or a full fine-tune's
    ``weights_file``) and, when it has one, an EMA file in the same layout (a safetensors
    file whose name says ``ema``)."""
    found = {RAW: files[weights_file]}
    ema = sorted(n for n in files
                 if n != weights_file and "ema" in n.lower() and n.endswith(".safetensors"))
    if ema:
        found[EMA] = files[ema[0]]
    return found


def _generator(item: ValidationItem, index: int, task_seed: int) -> torch.Generator:
    """A row's own seed decides its image alone; else (task seed, row index) do."""
    if item.seed is not None:
        return generator(item.seed, "validation", 0)
    return generator(task_seed, "validation", index)


def _parameters(item: ValidationItem, seed: int, step: int, adapter: str) -> str:
    """The PNG's text chunk, as AUTOMATIC1111 writes it."""
    lines = [item.prompt]
    if item.negative_prompt:
        lines.append(f"Negative prompt: {item.negative_prompt}")
    lines.append(f"Steps: {item.steps}, CFG scale: {item.guidance_scale}, Seed: {seed}, "
                 f"Size: {item.width}x{item.height}, Global step: {step}, Adapter: {adapter}")
    return "\n".join(lines)


@torch.no_grad()
def render_items(pipe: Any, items: list[ValidationItem], task_seed: int, device: torch.device,
                 dtype: torch.dtype) -> list[Any]:
    images = []
    for i, item in enumerate(items):
        with autocast(device, dtype):
            out = pipe(item.prompt, negative_prompt=item.negative_prompt,
                       num_inference_steps=item.steps, guidance_scale=item.guidance_scale,
                       height=item.height, width=item.width,
                       generator=_generator(item, i, task_seed), output_type="pil")
        images.append(out.images[0])
    return images


def read_step(folder: str, lora_sha256: str) -> StepValidation | None:
    """The step validated before from the same LoRA file, if its ``loss.json`` says so."""
    try:
        record = json.loads(storage.read_bytes(storage.join(folder, LOSS_FILE)))
    except (FileNotFoundError, ValueError):
        return None
    if record.get("lora_sha256") != lora_sha256:
        return None
    images = {name: [storage.join(folder, rel) for rel in value["images"]]
              for name, value in record["adapters"].items()}
    return StepValidation(
        global_step=int(record["global_step"]), folder=folder, images=images,
        loss={name: float(v["loss"]) for name, v in record["adapters"].items()},
        source=record["source"], prompts=list(record.get("prompts", [])),
    )


def validate_step(task: TaskDefinition, checkpoint_url: str, output_dir: str,
                  dataset: Any) -> StepValidation:
    """Images and held-out loss of the checkpoint at ``checkpoint_url`` (every adapter in
    it), into ``validation/step-N/``; a step done before from the same file is returned.

    A full fine-tune's checkpoint (``training_type: "full"``) holds whole weights, not an
    adapter: they are copied into the freshly loaded UNet (and text encoders) instead,
    and ``lora_sha256`` records the sha256 of that weights file."""
    full = task.training_type == "full"
    weights_file = WEIGHTS_FILE if full else LORA_FILE
    manifest = read_manifest(checkpoint_url)
    step = manifest.global_step
    folder = step_dir(output_dir, step)
    lora_sha = manifest.files[weights_file]["sha256"]
    done = read_step(folder, lora_sha)
    if done is not None:
        return done
    items = validation_items(task, dataset)
    held_out = held_out_set(task, items, dataset)
    loaded = read_checkpoint(checkpoint_url)

    device = training_device()
    base = load_base_model(task, device)
    adapted = None if full else add_lora_adapters(base, task)
    base.unet.to(device)
    prediction = task.train_args.prediction_type or base.noise_scheduler.config.prediction_type
    pipe = pipeline_from_base(
        base, scheduler_for_inference(base.location, task.model.revision, prediction)
    )
    pipe.set_progress_bar_config(disable=True)

    images: dict[str, list[str]] = {}
    adapters: dict[str, dict[str, Any]] = {}
    for name, data in adapter_files(loaded.files, weights_file).items():
        try:
            if full:
                put_trained_weights(base, data)
            else:
                restore_lora(data, adapted)
        except LoraFileError as exc:
            if name == RAW:
                raise
            log.warning("the checkpoint's EMA file does not fit the adapter (%s): not shown", exc)
            continue
        loss = validation_loss(base, prediction, held_out, task.seed)
        rendered = render_items(pipe, items, task.seed, device, base.dtype)
        relative = [f"{i:02d}.png" if name == RAW else f"{name}/{i:02d}.png"
                    for i in range(len(items))]
        for i, (item, image) in enumerate(zip(items, rendered, strict=True)):
            seed = item.seed if item.seed is not None else task.seed
            storage.write_bytes(storage.join(folder, relative[i]),
                                png_bytes(image, _parameters(item, seed, step, name)))
        images[name] = [storage.join(folder, rel) for rel in relative]
        adapters[name] = {**loss, "images": relative}

    prompts = [item.prompt for item in items]
    storage.write_bytes(storage.join(folder, STEP_PROMPTS_FILE), json.dumps({
        "global_step": step, "items": [item.describe(task.seed) for item in items],
    }, indent=2).encode())
    record = {
        "global_step": step, "loss": adapters[RAW]["loss"], "source": held_out.source,
        "examples": len(held_out.examples), "held_out_indexes": held_out.indexes,
        "timesteps": [int(t) for t in adapters[RAW]["per_timestep"]],
        "adapters": adapters, "prompts": prompts, "lora_sha256": lora_sha,
    }
    storage.write_bytes(storage.join(folder, LOSS_FILE), json.dumps(record, indent=2).encode())
    return StepValidation(global_step=step, folder=folder, images=images,
                          loss={n: float(a["loss"]) for n, a in adapters.items()},
                          source=held_out.source, prompts=prompts)
