"""The models a benchmark trains: full-size architectures with random weights, or tiny ones.

Full-size models (SD1.5, SD2.1 768-v, SDXL base) are built from the published configs in
``engine/bench/configs/*.json`` with random weights, in memory: throughput and memory do
not depend on weight values, and nothing is downloaded. The tokenizers are the tiny
embedded CLIP-style tokenizer (ids stay far below the real 49408-token vocabulary; the
sequence length, 77, is the real one), so the text encoders do the real amount of work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.model.family import detect_family
from engine.model.loading import BaseModel

CONFIG_DIR = Path(__file__).parent / "configs"

#: CLI family name -> model: a full-size config in configs/ or an embedded tiny model.
FAMILIES: dict[str, str] = {
    "sd1": "sd15", "sd15": "sd15", "sd2": "sd21", "sd21": "sd21", "sdxl": "sdxl",
    "tiny-sd1": "tiny-sd1", "tiny-sd2": "tiny-sd2", "tiny-sdxl": "tiny-sdxl",
}
FULL_SIZE = ("sd15", "sd21", "sdxl")


def load_bench_config(model: str) -> dict[str, Any]:
    """The published component configs of a full-size model (see configs/)."""
    if model not in FULL_SIZE:
        raise ValueError(f"no full-size config for {model!r}; expected one of {FULL_SIZE}")
    return json.loads((CONFIG_DIR / f"{model}.json").read_text(encoding="utf-8"))


def native_resolution(model: str) -> int:
    return int(load_bench_config(model)["native_resolution"]) if model in FULL_SIZE else 64


def _text_encoder(config: dict[str, Any]) -> Any:
    """A CLIP text model (with projection when the config says so) from a config dict."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    values = {k: v for k, v in config.items() if not k.startswith("_")}
    projected = config["_architecture"] == "CLIPTextModelWithProjection"
    cls = CLIPTextModelWithProjection if projected else CLIPTextModel
    return cls(CLIPTextConfig(**values)).eval()


def build_modules(model: str) -> dict[str, Any]:
    """UNet, VAE and text encoder(s) of a full-size model, on the current default device.

    Under ``with torch.device("meta")`` this builds the architecture without allocating
    weights (cheap enough for a unit test of SDXL's 2.6 B parameters).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = load_bench_config(model)
    modules = {
        "unet": UNet2DConditionModel(**config["unet"]).eval(),
        "vae": AutoencoderKL(**config["vae"]).eval(),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in config:
            modules[name] = _text_encoder(config[name])
    return modules


def build_pipeline(model: str) -> Any:
    """A diffusers pipeline with random weights (fp32, CPU), full-size or tiny.

    A pipeline object rather than loose modules because the restart measurement saves it
    with ``save_pretrained`` and loads it back the way a segment loads a base model.
    """
    if model not in FULL_SIZE:
        from engine.model.embedded.tiny_models import build_tiny_pipeline

        return build_tiny_pipeline(model)
    import diffusers

    from engine.model.embedded.tiny_models import make_tokenizer

    config = load_bench_config(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        modules = build_modules(model)
    scheduler_config = dict(config["scheduler"])
    scheduler_class = getattr(diffusers, scheduler_config.pop("_class_name"))
    scheduler = scheduler_class.from_config(scheduler_config)
    tokenizers = {name: make_tokenizer(config[name]["pad_token"])
                  for name in ("tokenizer", "tokenizer_2") if name in config}
    pipeline_class = getattr(diffusers, config["model_index"]["_class_name"])
    extra: dict[str, Any] = (
        {"force_zeros_for_empty_prompt": True, "add_watermarker": False}
        if "text_encoder_2" in modules
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    return pipeline_class(**modules, **tokenizers, scheduler=scheduler, **extra)


def base_from_pipeline(pipe: Any, device: torch.device, dtype: torch.dtype,
                       location: str) -> BaseModel:
    """The frozen base as :func:`engine.model.loading.load_base_model` would hand it over.

    Same placement and dtypes: UNet in the weight dtype left on the CPU (build_trainer
    moves it), VAE in fp32 under fp16 (it overflows) else in the weight dtype, text
    encoders in the weight dtype; all frozen. The family is detected from the configs.
    Not ``load_base_model`` itself: that reads a folder, and writing a multi-GB random
    model to disk first would cost more than everything it measures (the restart
    measurement does write one, and does call ``load_base_model``).
    """
    from diffusers import DDPMScheduler

    index = {"_class_name": type(pipe).__name__}
    family = detect_family(index, dict(pipe.unet.config), dict(pipe.scheduler.config))
    unet = _placed(pipe.unet, torch.device("cpu"), dtype)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    base = BaseModel(location, family, device, dtype, unet, noise_scheduler)
    base.vae = _placed(pipe.vae, device, torch.float32 if dtype == torch.float16 else dtype)
    for tok_dir, enc_dir in family.text_encoders:
        base.tokenizers.append(getattr(pipe, tok_dir))
        base.text_encoders.append(_placed(getattr(pipe, enc_dir), device, dtype))
    return base


def _placed(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Frozen, in eval mode, on ``device``; cast only when the dtype differs (diffusers
    warns on every ``.to(dtype)``)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module.to(device).eval().requires_grad_(False)


def parameter_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_processors(unet: Any) -> list[str]:
    """Class names of the UNet's attention processors (AttnProcessor2_0 = torch SDPA)."""
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})
