"""DreamBooth class images: made by the base model itself, once, exactly, resumably.

Prior preservation needs ``num_class_images`` images of the class (``class_prompt``) as
the base model draws them. They are generated here, or partly taken from
``dreambooth.class_data_dir`` (used first, in name order; only the rest is generated).

Why they can be trusted as a cached step:

* deterministic: image ``i`` is denoised from latents drawn from ``generator(seed,
  "class_image", i)``, and images are generated in fixed groups of ``batch_size``
  (``[0, b)``, ``[b, 2b)``, ...), so a group holds the same images on every run;
* fingerprinted: the folder's address is a hash of everything that decides the pixels
  (the model's arguments and the identity of its local files, precision, prompts, count,
  seed, sampler settings, resolution, batch size);
* resumable: each PNG is written atomically as soon as its group is made, so a killed
  step leaves only complete images, and the next run regenerates just the groups that
  miss one (writing only the missing files). A run that finds all of them loads no model
  and generates nothing.

The images then become the class subset (:mod:`engine.data.class_subset`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.data.class_subset import (
    FolderImages,
    commit_class_subset,
    folder_images,
    record_buckets,
)
from engine.data.errors import DatasetError
from engine.data.identity import canonical_json
from engine.data.layout import DatasetManifest
from engine.infer.validation import describe, png_bytes
from engine.model.loading import resolve_model_location
from engine.model.precision import autocast
from engine.store import storage
from engine.task.definition import DreamBoothArgs, TaskDefinition
from engine.train.seeding import generator

#: Under the data root: ``class-images/<fingerprint>/NNNNNN.png`` (+ ``key.json``).
CLASS_IMAGES_DIR = "class-images"
KEY_FILE = "key.json"
#: Bump when the way images are made changes (the same key would no longer mean the same
#: pixels).
GENERATION_FORMAT = 1


@dataclass(frozen=True)
class GeneratedImages:
    """The generated class images: where, their URLs in order, how many were made now."""

    address: str
    fingerprint: str
    files: list[str]
    generated: int
    reused: int


@dataclass(frozen=True)
class ClassSubset:
    """The prepared class subset and where its images came from."""

    manifest: DatasetManifest
    from_folder: int
    generated: int
    reused: int

    def counts(self) -> dict[str, Any]:
        """For the run summary: generated now vs found (a re-run shows generated 0)."""
        return {"count": self.manifest.count, "from_folder": self.from_folder,
                "generated": self.generated, "reused": self.reused}  # no path: it is published


# -- identity ----------------------------------------------------------------------------


def seed_of(task: TaskDefinition) -> int:
    db = _dreambooth(task)
    return task.seed if db.seed is None else db.seed


def resolution_of(task: TaskDefinition) -> int:
    db = _dreambooth(task)
    return db.resolution or task.train_args.resolution


def generation_key(task: TaskDefinition, count: int) -> dict[str, Any]:
    """Everything that decides the pixels of ``count`` generated class images."""
    db = _dreambooth(task)
    return {
        "format": GENERATION_FORMAT,
        "model": task.model.stable_dump(mode="json"),
        "model_files": model_files(task),
        "precision": task.mixed_precision,
        "prompt": db.class_prompt,
        "negative_prompt": db.negative_prompt,
        "count": count,
        "seed": seed_of(task),
        "num_inference_steps": db.num_inference_steps,
        "guidance_scale": db.guidance_scale,
        "resolution": resolution_of(task),
        "batch_size": db.batch_size,
    }


def fingerprint(key: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:32]


def model_files(task: TaskDefinition) -> dict[str, Any]:
    """The identity of the model's local folders (and of local component overrides):
    each config (without its load path) and each weight file's size, by relative path.

    Read without loading anything, so a run that finds its images loads no model; a
    local folder whose weights were replaced under the same path gets new images. A Hub
    id is known by its name and revision (in the model arguments).
    """
    model = task.model
    places = {"model": resolve_model_location(model), "vae": model.vae, "unet": model.unet,
              "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}
    return {name: _folder_identity(Path(where)) for name, where in places.items()
            if where and Path(where).is_dir()}


def _folder_identity(root: Path) -> list[Any]:
    out: list[Any] = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.suffix == ".safetensors":
            out.append([rel, path.stat().st_size])
        elif path.suffix == ".json" and path.stat().st_size < 1_000_000:
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(config, dict):
                config.pop("_name_or_path", None)
            out.append([rel, config])
    return out


# -- generation --------------------------------------------------------------------------


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def ensure_generated(task: TaskDefinition, root: str, count: int,
                     pipeline: Any | None = None) -> GeneratedImages:
    """The ``count`` class images of ``task`` under ``root`` (generated where missing).

    ``pipeline``: (pipe, device, dtype) to use; by default the task's base model is
    loaded, and only when an image is missing.
    """
    db = _dreambooth(task)
    key = generation_key(task, count)
    digest = fingerprint(key)
    address = storage.join(root, digest)
    names = [image_name(i) for i in range(count)]
    present = set(storage.list_files(address))
    groups = [range(start, min(start + db.batch_size, count))
              for start in range(0, count, db.batch_size)]
    todo = [g for g in groups if any(names[i] not in present for i in g)]
    generated = 0
    if todo:
        storage.write_bytes(storage.join(address, KEY_FILE),
                            json.dumps(key, indent=2, sort_keys=True).encode())
        pipe, device, dtype = pipeline or base_pipeline(task)
        for group in todo:
            for i, image in zip(group, render_group(pipe, task, list(group), device, dtype),
                                strict=True):
                if names[i] in present:  # made by an earlier run: the same bytes
                    continue
                params = describe(db.class_prompt, db.num_inference_steps, db.guidance_scale,
                                  seed_of(task), resolution_of(task), f"Class image: {i}")
                storage.write_bytes(storage.join(address, names[i]), png_bytes(image, params))
                generated += 1
    return GeneratedImages(address=address, fingerprint=digest,
                           files=[storage.join(address, n) for n in names],
                           generated=generated, reused=count - generated)


@torch.no_grad()
def render_group(pipe: Any, task: TaskDefinition, indices: list[int], device: torch.device,
                 dtype: torch.dtype) -> list[Any]:
    """The images of ``indices``, in one pipeline call, each from its own generator."""
    db = _dreambooth(task)
    size = resolution_of(task)
    n = len(indices)
    with autocast(device, dtype):
        out = pipe(
            [db.class_prompt] * n,
            negative_prompt=[db.negative_prompt] * n if db.negative_prompt else None,
            num_inference_steps=db.num_inference_steps,
            guidance_scale=db.guidance_scale,
            height=size,
            width=size,
            generator=[generator(seed_of(task), "class_image", i) for i in indices],
            output_type="pil",
        )
    return list(out.images)


def base_pipeline(task: TaskDefinition) -> tuple[Any, torch.device, torch.dtype]:
    """The task's base model (with its component overrides) as a pipeline, sampling with
    its own scheduler and prediction type: the class as the model draws it today."""
    from engine.infer.pipeline import pipeline_from_base, scheduler_for_inference
    from engine.model.loading import load_base_model, training_device

    device = training_device()
    base = load_base_model(task, device)
    base.unet.to(device)
    own = str(base.noise_scheduler.config.get("prediction_type", "epsilon"))
    pipe = pipeline_from_base(
        base, scheduler_for_inference(base.location, task.model.revision, own)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, device, base.dtype


# -- the class subset --------------------------------------------------------------------


def ensure_class_subset(task: TaskDefinition, data_root: str,
                        pipeline: Any | None = None) -> ClassSubset:
    """The prepared class subset of ``task`` under ``data_root``: class_data_dir's images
    first, then generated ones up to ``num_class_images``; all found when committed."""
    db = _dreambooth(task)
    taken = (folder_images(db.class_data_dir, db.num_class_images)
             if db.class_data_dir else FolderImages())
    missing = db.num_class_images - len(taken.images)
    if missing and not db.generate:
        raise DatasetError(
            f"dreambooth.class_data_dir holds {len(taken.images)} usable image(s) but "
            f"num_class_images is {db.num_class_images} and dreambooth.generate is false: "
            "add images, lower num_class_images or allow generation"
        )
    images = list(taken.images)
    made = GeneratedImages("", "", [], 0, 0)
    if missing:
        made = ensure_generated(task, storage.join(data_root, CLASS_IMAGES_DIR), missing,
                                pipeline)
        images += [storage.read_bytes(url) for url in made.files]
    manifest = commit_class_subset(data_root, images, db.class_prompt, record_buckets(task),
                                   taken.skipped)
    return ClassSubset(manifest, from_folder=len(taken.images), generated=made.generated,
                       reused=made.reused)


def _dreambooth(task: TaskDefinition) -> DreamBoothArgs:
    if task.dreambooth is None:
        raise ValueError("the task has no dreambooth section")
    return task.dreambooth
