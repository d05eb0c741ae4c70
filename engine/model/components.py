"""Component overrides: a UNet, text encoder(s), tokenizer(s) or VAE from elsewhere.

A task may name, beside its model, a component to use instead of the model's own
(``model.unet``, ``model.text_encoder``, ``model.text_encoder_2``, ``model.tokenizer``,
``model.tokenizer_2``, ``model.vae``) and a dtype for each weight-holding component
(``model.unet_dtype``, ...), as finetrainers' ``--text_encoder_id`` / ``--vae_id`` /
``--*_dtype`` do. Each override is checked before any weight is read: the folder or Hub
ID must exist, and its config must fit the base model (an SDXL text encoder given to an
SD 1.x model is refused, naming the field and both families), because a mismatch
otherwise shows up minutes later as a shape error deep inside the UNet.

An override is a component folder (``config.json`` at its root, or the tokenizer's
files) or a whole diffusers model folder, whose same-named subfolder is then used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigurationError
from engine.model.family import Family
from engine.task.definition import ModelArgs

#: Overridable components: field of ``model`` -> the base model's subfolder.
SUBFOLDERS: dict[str, str] = {
    "unet": "unet", "vae": "vae", "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2", "tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2",
}
_SDXL_ONLY = ("text_encoder_2", "tokenizer_2", "text_encoder_2_dtype")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: The config keys that decide whether a component fits in place of another.
_FITS: dict[str, tuple[str, ...]] = {
    "unet": ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
             "projection_class_embeddings_input_dim", "addition_time_embed_dim"),
    "vae": ("latent_channels", "scaling_factor"),
    "text_encoder": ("hidden_size", "projection_dim", "vocab_size"),
}


class ComponentError(ConfigurationError):
    """A component override is missing or does not fit the base model."""


@dataclass(frozen=True)
class ComponentSource:
    """Where one component loads from: the base model's subfolder, or an override."""

    role: str  # unet | vae | text_encoder | text_encoder_2 | tokenizer | tokenizer_2
    location: str
    subfolder: str | None
    overridden: bool
    given: str  # what the task says (a model name or the override), for messages

    @property
    def field(self) -> str:
        return f"model.{self.role}"


def overrides(model: ModelArgs) -> dict[str, str]:
    """The components a task takes from elsewhere: {role: ID or path}, in a fixed order."""
    return {role: getattr(model, role) for role in SUBFOLDERS if getattr(model, role)}


def source_of(model: ModelArgs, location: str, role: str) -> ComponentSource:
    """Where ``role`` loads from (the override resolved: embedded ids built locally)."""
    given = getattr(model, role)
    if not given:
        return ComponentSource(role, location, SUBFOLDERS[role], False, model.name)
    from engine.model.embedded.registry import resolve_model

    where = resolve_model(given)
    sub = SUBFOLDERS[role]
    if (Path(where) / "model_index.json").is_file() and (Path(where) / sub).is_dir():
        return ComponentSource(role, where, sub, True, given)
    return ComponentSource(role, where, None, True, given)


def component_dtype(model: ModelArgs, role: str, default: torch.dtype,
                    device: torch.device) -> torch.dtype:
    """The dtype ``model.<role>_dtype`` asks for, else ``default``; fp16 on a CPU refused."""
    wanted = getattr(model, f"{role}_dtype", None)
    if wanted is None:
        return default
    if wanted == "fp16" and device.type == "cpu":
        raise ComponentError(f"model.{role}_dtype 'fp16' needs a GPU; use 'bf16' or 'fp32' "
                             "on a CPU")
    return _DTYPES[wanted]


# -- checked before loading ------------------------------------------------------------


def check_overrides(model: ModelArgs, location: str, family: Family) -> None:
    """Refuse, before any weight is read, an override that is missing or does not fit."""
    for field in _SDXL_ONLY:
        if getattr(model, field) is not None and not family.is_sdxl:
            raise ComponentError(
                f"model.{field} is for SDXL models (two text encoders); {model.name!r} is "
                f"{_family_words(family)} with one text encoder"
            )
    for role in overrides(model):
        source = source_of(model, location, role)
        _require_exists(source)
        if role.startswith("tokenizer"):
            continue
        theirs = _config(source)
        ours = _config(ComponentSource(role, location, SUBFOLDERS[role], False, model.name))
        _check_fits(source, theirs, ours, family)
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    for tok, enc in pairs[: len(family.text_encoders)]:
        if getattr(model, tok) or getattr(model, enc):
            _check_vocabulary(model, location, tok, enc)


def _require_exists(source: ComponentSource) -> None:
    where = source.location
    if os.path.isdir(where):
        folder = Path(where) / (source.subfolder or "")
        wanted = "tokenizer_config.json" if source.role.startswith("tokenizer") else "config.json"
        if not (folder / wanted).is_file():
            raise ComponentError(f"{source.field}: {source.given!r} is a folder without "
                                 f"{wanted}, so it is no {source.role.replace('_', ' ')}")
        return
    from engine.model import hub

    if os.path.exists(where) or not hub.is_hub_id(where):
        raise ComponentError(f"{source.field}: no such folder {source.given!r}")
    filename = "tokenizer_config.json" if source.role.startswith("tokenizer") else "config.json"
    reason = hub.model_unavailable(where, filename, None)
    if reason is not None:
        raise ComponentError(f"{source.field}: {source.given!r} {reason}")


def _config(source: ComponentSource) -> dict[str, Any]:
    """A component's config.json, read without its weights (local or from the Hub)."""
    if os.path.isdir(source.location):
        path = Path(source.location) / (source.subfolder or "") / "config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ComponentError(f"{source.field}: cannot read {path.name} of "
                                 f"{source.given!r}: {exc}") from None
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source.location, "config.json", subfolder=source.subfolder)
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ComponentError(f"{source.field}: cannot read the config of {source.given!r}: "
                             f"{exc}") from None


def _check_fits(source: ComponentSource, theirs: dict[str, Any], ours: dict[str, Any],
                family: Family) -> None:
    kind = "text_encoder" if source.role.startswith("text_encoder") else source.role
    if kind == "text_encoder":
        theirs_class, ours_class = _architecture(theirs), _architecture(ours)
        if theirs_class != ours_class:
            raise ComponentError(
                f"{source.field}: {source.given!r} is a {theirs_class}, "
                f"{_text_encoder_family(theirs)}; {_family_words(family)} needs a "
                f"{ours_class} there ({_text_encoder_family(ours)})"
            )
    for key in _FITS[kind]:
        if theirs.get(key) != ours.get(key):
            what = (_text_encoder_family(theirs) if kind == "text_encoder"
                    else _component_family(kind, theirs))
            raise ComponentError(
                f"{source.field}: {source.given!r} does not fit {_family_words(family)}: its "
                f"{key} is {theirs.get(key)!r} where the model's own {source.role} has "
                f"{ours.get(key)!r} ({what})"
            )


def _check_vocabulary(model: ModelArgs, location: str, tok_role: str, enc_role: str) -> None:
    """A tokenizer must not produce ids past its text encoder's vocabulary."""
    from transformers import AutoTokenizer

    tok = source_of(model, location, tok_role)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok.location, subfolder=tok.subfolder or "")
    except (OSError, ValueError) as exc:
        raise ComponentError(f"{tok.field}: cannot load {tok.given!r}: {exc}") from None
    vocab = _config(source_of(model, location, enc_role)).get("vocab_size")
    if vocab is not None and len(tokenizer) > int(vocab):
        raise ComponentError(
            f"model.{tok_role}: {tok.given!r} has {len(tokenizer)} tokens but the "
            f"{enc_role.replace('_', ' ')} knows {vocab}: they are not a pair"
        )


def _architecture(config: dict[str, Any]) -> str:
    names = config.get("architectures") or ["CLIPTextModel"]
    return str(names[0])


def _family_words(family: Family) -> str:
    return {"sd1": "an SD 1.x model", "sd2": "an SD 2.x model",
            "sdxl": "an SDXL model"}[family.name]


def _text_encoder_family(config: dict[str, Any]) -> str:
    """Which family a text encoder belongs to, as far as its config says."""
    if "WithProjection" in _architecture(config):
        return "the second text encoder of an SDXL model"
    return {768: "the text encoder of an SD 1.x model (or SDXL's first)",
            1024: "the text encoder of an SD 2.x model"}.get(
        config.get("hidden_size"), f"a text encoder of width {config.get('hidden_size')}")


def _component_family(kind: str, config: dict[str, Any]) -> str:
    if kind == "vae":
        return {0.18215: "an SD 1.x / 2.x VAE", 0.13025: "an SDXL VAE"}.get(
            config.get("scaling_factor"), "a VAE of another model")
    if config.get("addition_embed_type") == "text_time":
        return "an SDXL UNet"
    return {768: "an SD 1.x UNet", 1024: "an SD 2.x UNet"}.get(
        config.get("cross_attention_dim"), "a UNet of another model")


def override_settings(model: ModelArgs) -> dict[str, Any]:
    """The override fields a task sets (components and dtypes), for fingerprints: what
    the cache holds depends on them. Empty for a task that sets none."""
    return {k: v for k, v in model.stable_dump().items() if k in type(model)._omit_when_default}
