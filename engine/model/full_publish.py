"""Publishing a finished full fine-tune: the whole model under ``model/``, with its card.

:func:`engine.model.full_export.publish_full_model` writes the model itself (the
diffusers folder and the single-file checkpoint); this adds what a LoRA folder carries
beside its weights, so a ``model/`` folder passed around on its own says what it is:

* ``README.md``: a small model card (a full fine-tune of which base, which files load
  where, the training settings, base vs fine-tuned validation images);
* ``task.json`` (the validated task, no local paths or credentials), ``run_summary.json``
  (``training_type: "full"``, the published files named, places relative to the run
  folder: engine/lora/public_summary.py), ``validation/*.png``,
  ``validation/base/*.png`` and the merged ``metrics.jsonl`` when given.

No LoRA file is written. Like the LoRA publishing, the bytes depend only on the inputs
(dates come from the run summary), so publishing twice rewrites the same files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from engine.lora.metadata import public_name, public_task_dict
from engine.lora.public_summary import public_run_summary
from engine.model.full_export import DIFFUSERS_DIR, MODEL_DIR, publish_full_model
from engine.store import storage
from engine.task.definition import TaskDefinition


def model_file_stem(task: TaskDefinition, run_summary: Mapping[str, Any]) -> str:
    """``loraflow_<run name or model name>``: the single file's name, without ``.safetensors``."""
    name = str(run_summary.get("run_name") or task.model.name.rsplit("/", 1)[-1])
    cleaned = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:64].strip("_")
    return f"loraflow_{cleaned or 'model'}"


def publish_full_run(
    checkpoint_url: str,
    task: TaskDefinition,
    output_url: str,
    *,
    dataset_hash: str,
    validation_images: list[str],
    base_images: list[str],
    metrics_url: str | None,
    run_summary: dict[str, Any],
) -> dict[str, Any]:
    """Write ``output_url``/model/ (model, card, task, summary, images); return the URLs."""
    stem = model_file_stem(task, run_summary)
    model = publish_full_model(checkpoint_url, task, output_url, stem)
    model_dir = model["model_dir"]
    images = _copy_all(validation_images, model_dir, "validation")
    base = _copy_all(base_images, model_dir, "validation/base")
    metrics = None
    if metrics_url:
        metrics = storage.join(model_dir, storage.basename(metrics_url))
        storage.write_bytes(metrics, storage.read_bytes(metrics_url))
    files = {"diffusers_model": f"{DIFFUSERS_DIR}/", "single_file": f"{stem}.safetensors"}
    summary = {**run_summary, "training_type": "full", "published": files}
    texts = {
        "task.json": _json_text(public_task_dict(task)),
        "run_summary.json": _json_text(public_run_summary(summary, output_url)),
        "README.md": model_card(task, run_summary, files, dataset_hash=dataset_hash,
                                images=[_relative(u, model_dir) for u in images],
                                base_images=[_relative(u, model_dir) for u in base],
                                metrics=storage.basename(metrics) if metrics else None),
    }
    for name, text in texts.items():
        storage.write_bytes(storage.join(model_dir, name), text.encode("utf-8"))
    return {
        **model,
        "readme": storage.join(model_dir, "README.md"),
        "task": storage.join(model_dir, "task.json"),
        "run_summary": storage.join(model_dir, "run_summary.json"),
        "validation": images,
        "base_validation": base,
        "metrics": metrics,
    }


def model_card(task: TaskDefinition, run_summary: Mapping[str, Any], files: Mapping[str, str],
               *, dataset_hash: str, images: list[str], base_images: list[str],
               metrics: str | None) -> str:
    """The README.md of a full fine-tune: what it is, which file loads where, how it trained."""
    base_model = public_name(task.model.name)
    ta = task.train_args
    trained = "UNet and text encoder(s)" if task.full_finetune.train_text_encoder else "UNet"
    title = str(run_summary.get("run_name") or f"loraflow fine-tune of {base_model}")
    lines = ["---", "library_name: diffusers", "tags:"]
    lines += [f"- {t}" for t in ("stable-diffusion", "text-to-image", "full-fine-tune",
                                 "loraflow")]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", task.model.name):
        lines.append(f"base_model: {task.model.name}")
    lines += ["---", "", f"# {title}", "",
              f"A **full fine-tune** of `{base_model}` trained with loraflow: every weight of "
              f"the {trained} trained (not a LoRA: this is a whole model).", "",
              "## Files", "",
              f"- `{files['diffusers_model']}`: a diffusers model folder: "
              f"`StableDiffusionPipeline.from_pretrained(\"{files['diffusers_model']}\")` "
              "(`StableDiffusionXLPipeline` for SDXL).",
              f"- `{files['single_file']}`: the single-file checkpoint in the original SD key "
              "layout: ComfyUI `models/checkpoints/`, A1111 / Forge `models/Stable-diffusion/`.",
              "", "## Training", "",
              f"- steps: {run_summary.get('global_step', '?')}, resolution {ta.resolution}, "
              f"learning rate {ta.learning_rate}, batch size {ta.batch_size} x "
              f"{ta.gradient_accumulation_steps} accumulation, seed {task.seed}",
              f"- trained: {trained}"
              + (f" (text encoder lr {task.full_finetune.text_encoder_learning_rate})"
                 if task.full_finetune.text_encoder_learning_rate else ""),
              f"- dataset hash: `{dataset_hash}`"]
    if ta.ema is not None:
        lines.append(f"- weights: the {ta.ema.publish} weights (EMA decay {ta.ema.decay})")
    if images:
        lines += ["", "## Validation images", ""]
        if base_images:
            lines += ["| base model | fine-tuned |", "| --- | --- |"]
            lines += [f"| ![base {i}]({b}) | ![fine-tuned {i}]({t}) |"
                      for i, (b, t) in enumerate(zip(base_images, images, strict=False))]
        else:
            lines += [f"![validation {i}]({t})" for i, t in enumerate(images)]
    if metrics:
        lines += ["", f"Training metrics, one JSON line per step: `{metrics}`."]
    return "\n".join(lines) + "\n"


def _copy_all(urls: list[str], model_dir: str, folder: str) -> list[str]:
    """Copy PNGs into ``model/<folder>/`` (names kept, a repeated name prefixed)."""
    copied, used = [], set()
    for i, url in enumerate(urls):
        name = storage.basename(url)
        name = f"{i:02d}_{name}" if name in used else name
        used.add(name)
        target = storage.join(model_dir, folder, name)
        storage.write_bytes(target, storage.read_bytes(url))
        copied.append(target)
    return copied


def _relative(url: str, model_dir: str) -> str:
    return url[len(model_dir):].lstrip("/")


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


__all__ = ["MODEL_DIR", "model_card", "model_file_stem", "publish_full_run"]
