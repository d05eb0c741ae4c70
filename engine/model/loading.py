"""Load the frozen base model and put a LoRA adapter on its UNet.

Components load through ``from_pretrained(name, subfolder=..., variant=..., revision=...)``,
the same path for a Hub ID, a local folder, and loraflow's embedded tiny models (built to
a local folder first). Weights load from safetensors only: a pickle file from the network
is never unpickled. A Hub model that is neither cached nor reachable is refused before
diffusers is asked (see :mod:`engine.model.hub`): at once, and naming the cause.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import ConfigurationError, LoraflowError
from engine.model import hub
from engine.model.components import check_overrides, component_dtype, source_of
from engine.model.family import Family, detect_family
from engine.model.precision import weight_dtype
from engine.task.definition import (
    DEFAULT_CONV_TARGET_MODULES,
    DEFAULT_TEXT_TARGET_MODULES,
    ModelArgs,
    TaskDefinition,
)
from engine.train.seeding import derive_seed

log = logging.getLogger(__name__)

class ModelLoadError(LoraflowError):
    """The base model could not be found or read."""


def training_device() -> torch.device:
    """CUDA when present; ``LORAFLOW_DEVICE`` overrides (e.g. ``cpu`` on a GPU host)."""
    wanted = os.environ.get("LORAFLOW_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_location(model: ModelArgs) -> str:
    """A Hub ID or local path; embedded ``loraflow/tiny-*`` ids are built locally first."""
    from engine.model.embedded.registry import resolve_model

    return resolve_model(model.name)


def require_available(name: str, location: str, revision: str | None, filename: str,
                      what: str = "model") -> None:
    """Refuse, fast and plainly, a model that is no local path and cannot be had from the Hub.

    ``filename`` is the file that makes it a model (``model_index.json``, ``config.json``).
    """
    if os.path.exists(location):
        return
    reason = hub.model_unavailable(location, filename, revision)
    if reason is not None:
        at = f" (revision {revision!r})" if revision and revision != "main" else ""
        raise ModelLoadError(f"{what} {name!r}{at} {reason}")


def _load_config(loader: Any, location: str, model: ModelArgs, subfolder: str | None) -> dict:
    try:
        kwargs = {"revision": model.revision}
        if subfolder:
            kwargs["subfolder"] = subfolder
        return dict(loader.load_config(location, **kwargs))
    except (OSError, ValueError) as exc:
        where = f"{subfolder}/ of " if subfolder else ""
        raise ModelLoadError(
            f"cannot read {where}model {model.name!r} (revision {model.revision!r}): {exc}"
            f"{hub.explain(exc)}"
        ) from None


def inspect_model(model: ModelArgs) -> tuple[str, Family]:
    """Find the model and read its family from model_index.json and configs (no weights)."""
    location = resolve_model_location(model)
    require_available(model.name, location, model.revision, "model_index.json")
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    index = _load_config(DiffusionPipeline, location, model, None)
    detect_family(index, {}, {})  # refuse SD3, Flux, ... before looking for a unet/
    unet_config = _load_config(UNet2DConditionModel, location, model, "unet")
    scheduler_config = _load_config(DDPMScheduler, location, model, "scheduler")
    return location, detect_family(index, unet_config, scheduler_config)


@dataclass
class BaseModel:
    """The frozen parts of a model, on one device in one dtype."""

    location: str
    family: Family
    device: torch.device
    dtype: torch.dtype
    unet: Any
    noise_scheduler: Any
    vae: Any = None
    tokenizers: list[Any] = field(default_factory=list)
    text_encoders: list[Any] = field(default_factory=list)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


@contextmanager
def _refused(what: str) -> Iterator[None]:
    """A component that cannot be read is the user's problem (exit code 2), cause named."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {what}: {exc}{hub.explain(exc)}") from None


def load_base_model(
    task: TaskDefinition, device: torch.device, *, with_vae: bool = True, with_text: bool = True
) -> BaseModel:
    """Load the UNet (on CPU, so the adapter is initialised by a CPU RNG) and the rest."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    location, family = inspect_model(task.model)
    check_overrides(task.model, location, family)  # before any weight is read
    dtype = weight_dtype(task.mixed_precision, device)
    common = {"revision": task.model.revision, "variant": task.model.variant}

    def load(cls: Any, subfolder: str, **extra: Any) -> Any:
        source = source_of(task.model, location, subfolder)
        if source.overridden:  # another folder or repository: its own revision and files
            where = f"{source.field} {source.given!r}"
            kwargs = {"subfolder": source.subfolder} if source.subfolder else {}
        else:
            where = f"{subfolder}/ of model {task.model.name!r} (variant {task.model.variant!r})"
            kwargs = {"subfolder": subfolder, **common}
        try:
            return cls.from_pretrained(source.location, use_safetensors=True, **kwargs, **extra)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load {where}: {exc}{hub.explain(exc)}") from None

    unet = load(UNet2DConditionModel, "unet",
                torch_dtype=component_dtype(task.model, "unet", dtype, device))
    unet.requires_grad_(False)
    with _refused(f"scheduler/ of model {task.model.name!r}"):
        scheduler = DDPMScheduler.from_pretrained(
            location, subfolder="scheduler", revision=task.model.revision
        )
    base = BaseModel(location, family, device, dtype, unet, scheduler)
    if with_vae:
        vae_dtype = component_dtype(task.model, "vae", dtype, device) if task.model.vae_dtype \
            else dtype
        base.vae = load_vae(task, location, vae_dtype, load).to(device).eval()
        base.vae.requires_grad_(False)
    if with_text:
        for i, (tok_dir, enc_dir) in enumerate(family.text_encoders):
            tok = source_of(task.model, location, tok_dir)
            with _refused(f"{tok_dir}/ of model {task.model.name!r}" if not tok.overridden
                          else f"{tok.field} {tok.given!r}"):
                base.tokenizers.append(AutoTokenizer.from_pretrained(
                    tok.location, subfolder=tok.subfolder or "",
                    **({} if tok.overridden else {"revision": task.model.revision})
                ))
            cls = CLIPTextModelWithProjection if (family.is_sdxl and i == 1) else CLIPTextModel
            enc_dtype = component_dtype(task.model, enc_dir, dtype, device)
            encoder = load(cls, enc_dir, dtype=enc_dtype).to(device).eval()
            encoder.requires_grad_(False)
            base.text_encoders.append(encoder)
    return base


def load_vae(task: TaskDefinition, location: str, dtype: torch.dtype, load: Any) -> Any:
    """The model's VAE, or the one ``model.vae`` names.

    The SD and SDXL VAEs overflow in fp16 (NaN latents), so under fp16 training the
    model's own VAE runs in fp32; a VAE named by the user (e.g. a fixed SDXL VAE) is
    trusted to be fp16-safe and runs in the training dtype.
    """
    from diffusers import AutoencoderKL

    if task.model.vae is None:
        upcast = dtype == torch.float16 and task.model.vae_dtype is None  # model.vae_dtype wins
        vae_dtype = torch.float32 if upcast else dtype
        return load(AutoencoderKL, "vae", torch_dtype=vae_dtype)
    from engine.model.embedded.registry import resolve_model

    vae_location = resolve_model(task.model.vae)
    require_available(task.model.vae, vae_location, None, "config.json", "the VAE (model.vae)")
    try:
        sub = source_of(task.model, location, "vae").subfolder  # a whole model folder: vae/
        return AutoencoderKL.from_pretrained(vae_location, torch_dtype=dtype, use_safetensors=True,
                                             **({"subfolder": sub} if sub else {}))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the VAE {task.model.vae!r} (model.vae): {exc}{hub.explain(exc)}"
        ) from None


# -- the adapter ----------------------------------------------------------------------


def lora_config(task: TaskDefinition) -> Any:
    """The UNet adapter's PEFT config; ``lora.conv`` adds the convolutions (LoCon)."""
    targets = task.target_modules
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv = task.lora.conv
    if conv is not None:
        conv_targets = list(conv.target_modules or DEFAULT_CONV_TARGET_MODULES)
        if isinstance(targets, str):
            names = "|".join(re.escape(t) for t in conv_targets)
            targets = rf"(?:{targets})|(?:(?:.*\.)?(?:{names}))"
        else:
            targets = [*targets, *(t for t in conv_targets if t not in targets)]
        for target in conv_targets:  # PEFT matches these as suffixes of module names
            pattern = re.escape(target)
            ranks[pattern] = conv.rank
            alphas[pattern] = conv.alpha if conv.alpha is not None else float(conv.rank)
    return adapter_config(task.lora.type, task.lora.rank, task.lora_alpha, targets,
                          task.lora.init_lora_weights, task.lora.lokr_factor, ranks, alphas)


def text_lora_config(task: TaskDefinition) -> Any:
    te = task.lora.text_encoder
    assert te is not None
    return adapter_config(
        task.lora.type, te.rank, te.alpha if te.alpha is not None else float(te.rank),
        te.target_modules or list(DEFAULT_TEXT_TARGET_MODULES), task.lora.init_lora_weights,
        task.lora.lokr_factor, {}, {},
    )


def adapter_config(kind: str, rank: int, alpha: float, targets: list[str] | str, init: Any,
                   lokr_factor: int, ranks: dict[str, int], alphas: dict[str, float]) -> Any:
    """PEFT's config for one adapter type. LoRA's stays exactly as before (no patterns
    passed when there are none), so a task without the new fields trains the same bits."""
    import peft

    patterns: dict[str, Any] = {"rank_pattern": ranks, "alpha_pattern": alphas} if ranks else {}
    if kind in ("lora", "dora"):
        extra = {"use_dora": True} if kind == "dora" else {}
        return peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                               target_modules=targets, **patterns, **extra)
    if init not in (True, False):
        raise ConfigurationError(
            f"lora.init_lora_weights {init!r} is a LoRA initialisation; {kind} takes true/false"
        )
    if kind == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, init_weights=init, target_modules=targets,
                               **patterns)
    return peft.LoKrConfig(r=rank, alpha=alpha, init_weights=init, target_modules=targets,
                           decompose_factor=lokr_factor, **patterns)


def _attach(module: Any, config: Any, seed: int, index: int, what: str, pointer: str) -> None:
    """Attach an adapter with weights drawn from a generator seeded by (seed, index).

    peft draws from the global RNG, so it runs inside a forked, seeded RNG: the
    initial adapter depends on the task seed only, and no global state leaks out.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "lora_init", index))
        try:
            module.add_adapter(config)
        except ValueError as exc:
            if "not found" in str(exc) or "Target modules" in str(exc):
                raise ConfigurationError(
                    f"{pointer} {config.target_modules!r} matches no module of the {what}: {exc}"
                ) from None
            raise
    for param in lora_parameters(module).values():
        param.data = param.data.float()  # trainable weights in fp32 whatever the base dtype


def add_lora_adapters(base: BaseModel, task: TaskDefinition) -> dict[str, Any]:
    """Adapters on the UNet (and text encoders when asked); returns {prefix: module}.

    The prefixes are the diffusers LoRA file's: unet, text_encoder, text_encoder_2.
    """
    _attach(base.unet, lora_config(task), task.seed, 0, "UNet", "lora.target_modules")
    adapted = {"unet": base.unet}
    if task.lora.text_encoder is not None:
        for i, encoder in enumerate(base.text_encoders):
            _attach(encoder.cpu(), text_lora_config(task), task.seed, i + 1, "text encoder",
                    "lora.text_encoder.target_modules")
            encoder.to(base.device)
            adapted["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
    return adapted


def lora_parameters(module: Any) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by name, in a stable (sorted) order."""
    params = {n: p for n, p in module.named_parameters() if is_adapter_parameter(n)}
    for param in params.values():
        param.requires_grad_(True)
    return dict(sorted(params.items()))


#: What PEFT's LoRA / DoRA, LoHa and LoKr layers name their trainable tensors.
ADAPTER_PARAMETER_MARKS = ("lora_", "hada_", "lokr_")


def is_adapter_parameter(name: str) -> bool:
    return any(mark in name for mark in ADAPTER_PARAMETER_MARKS)
