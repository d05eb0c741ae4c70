"""Publishing a full fine-tune: a diffusers model folder and one single-file checkpoint.

From the last committed checkpoint's trained weights this writes ``<output>/model/``:

* ``diffusers/``: ``save_pretrained`` of the base pipeline (component overrides applied)
  with the trained UNet (and text encoders), safetensors only: what
  ``DiffusionPipeline.from_pretrained`` loads;
* ``<slug>.safetensors``: every weight in the original SD key layout
  (:mod:`engine.model.single_file`), what ComfyUI, A1111 and Forge load from their
  checkpoints folder, with a ``modelspec.*`` header naming the architecture.

The files hold weights and configs only: no local path (diffusers' ``_name_or_path`` is
dropped from every config).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.model.single_file import single_file_state
from engine.store import storage
from engine.store.commit import read_checkpoint
from engine.store.safetensors_io import dump
from engine.task.definition import TaskDefinition

MODEL_DIR = "model"
DIFFUSERS_DIR = "diffusers"
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                 "sdxl": "stable-diffusion-xl-v1-base"}


def publish_full_model(checkpoint_url: str, task: TaskDefinition, output_url: str,
                       file_stem: str) -> dict[str, Any]:
    """Write ``output_url``/model/ from a full fine-tune's checkpoint; return the URLs."""
    from engine.infer.pipeline import pipeline_from_base, scheduler_for_inference
    from engine.model.loading import load_base_model

    loaded = read_checkpoint(checkpoint_url)
    cpu = torch.device("cpu")
    plain = task.model_copy(update={"mixed_precision": "no"})  # published in fp32
    base = load_base_model(plain, cpu)
    put_trained_weights(base, loaded.files[published_weights_file(task)])
    prediction = task.train_args.prediction_type or base.noise_scheduler.config.prediction_type
    scheduler = scheduler_for_inference(base.location, task.model.revision, prediction)
    pipe = pipeline_from_base(base, scheduler)
    model_dir = storage.join(output_url, MODEL_DIR)
    folder = storage.join(model_dir, DIFFUSERS_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                if path.suffix == ".json":
                    data = _without_local_paths(data)
                storage.write_bytes(storage.join(folder, *path.relative_to(tmp).parts), data)
    state = single_file_state(base.family.name, base.unet, base.vae, base.text_encoders)
    meta = {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": _ARCHITECTURE[base.family.name],
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
            if base.family.is_sdxl else "https://github.com/Stability-AI/stablediffusion",
            "modelspec.title": file_stem, "modelspec.prediction_type": prediction,
            "loraflow.global_step": str(loaded.global_step)}
    single = storage.join(model_dir, f"{file_stem}.safetensors")
    storage.write_bytes(single, dump(state, meta))
    return {"model_dir": model_dir, "diffusers_model": folder, "single_file": single}


def published_weights_file(task: TaskDefinition) -> str:
    """The checkpoint file the published model (and the final validation) comes from:
    the EMA of the weights when ``train_args.ema`` publishes it, else the trained ones."""
    from engine.train.ema import EMA_FILE
    from engine.train.full_finetune import WEIGHTS_FILE

    ema = task.train_args.ema
    return EMA_FILE if ema is not None and ema.publish == "ema" else WEIGHTS_FILE


def put_trained_weights(base: Any, data: bytes) -> None:
    """Copy a full fine-tune's weights file into ``base``'s UNet (and text encoders).

    Each module it names is made fp32 first, as it trained, so the copy is exact;
    autocast still renders in the task's precision.
    """
    from engine.train.full_finetune import state_dicts

    modules = {"unet": base.unet, **{("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): e
                                     for i, e in enumerate(base.text_encoders)}}
    for prefix, weights in state_dicts(data).items():
        modules[prefix].float().load_state_dict(weights, strict=True)


def _without_local_paths(data: bytes) -> bytes:
    """A config JSON without ``_name_or_path`` (where this machine loaded it from)."""
    try:
        config = json.loads(data)
    except ValueError:
        return data
    if isinstance(config, dict) and "_name_or_path" in config:
        config.pop("_name_or_path")
        return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return data
