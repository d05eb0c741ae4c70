"""The one way loraflow builds a diffusers pipeline, in memory or from the model's files.

The pipeline class comes from the model's family (``model_index.json``'s class, checked
by :func:`engine.model.family.detect_family`), never from a second lookup elsewhere.
Validation during a segment reuses the adapted, already loaded modules
(:func:`pipeline_from_base`); validation of a checkpoint and ``loraflow generate`` load
the base model afresh (:func:`load_pipeline`), safetensors only.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.model.family import Family
from engine.model.loading import BaseModel, ModelLoadError, inspect_model
from engine.task.definition import ModelArgs


def pipeline_class(family: Family) -> Any:
    """The diffusers pipeline class of ``family`` (StableDiffusion[XL]Pipeline)."""
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def scheduler_for_inference(location: str, revision: str, prediction_type: str) -> Any:
    """The model's own inference scheduler, predicting what the LoRA was trained to."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(location, subfolder="scheduler", revision=revision)
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
    return cls.from_config({**config, "prediction_type": prediction_type})


def pipeline_from_base(base: BaseModel, scheduler: Any) -> Any:
    """A pipeline around the modules of ``base`` as they are (LoRA adapters included)."""
    components: dict[str, Any] = {
        "vae": base.vae, "unet": base.unet, "scheduler": scheduler,
        "text_encoder": base.text_encoders[0], "tokenizer": base.tokenizers[0],
    }
    if base.family.is_sdxl:
        components |= {"text_encoder_2": base.text_encoders[1], "tokenizer_2": base.tokenizers[1]}
    else:
        components |= _without_safety_checker(base.family) | {"feature_extractor": None}
    return pipeline_class(base.family)(**components)


def load_pipeline(model: ModelArgs, dtype: torch.dtype, *,
                  safety_checker: bool) -> tuple[Any, str, Family]:
    """(pipeline, model location, family) of the base model, loaded from its files.

    ``safety_checker=False`` leaves out an SD model's NSFW checker: validation images
    are for judging the training and must show what the model drew.
    """
    location, family = inspect_model(model)
    extra = {} if safety_checker else _without_safety_checker(family)
    try:
        pipe = pipeline_class(family).from_pretrained(
            location, revision=model.revision, variant=model.variant, dtype=dtype,
            use_safetensors=True, **extra,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {model.name!r}: {exc}") from None
    return pipe, location, family


def _without_safety_checker(family: Family) -> dict[str, Any]:
    """SD pipelines' arguments for no NSFW checker; SDXL pipelines have none."""
    if family.is_sdxl:
        return {}
    return {"safety_checker": None, "requires_safety_checker": False}
