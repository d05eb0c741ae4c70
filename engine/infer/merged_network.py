"""LoHa, LoKr and DoRA files on a diffusers pipeline: their weight changes merged into the
base weights, computed from the file as ComfyUI computes them.

diffusers' ``load_lora_weights`` cannot be used: it refuses LyCORIS LoHa / LoKr files of
SD 1.x / 2.x / SDXL ("The following keys have not been correctly renamed", measured with
0.42.1) and loads a kohya DoRA file with its ``dora_scale`` dropped (a plain LoRA, with
a warning). Merging needs no adapter config guessed back from shapes (PEFT's LoKr
factorization, its rank patterns), and the weight each layer gets is the one every
loader of the file builds. The base weights are kept, so the strength can be changed
afterwards (:func:`set_strength`): weight = W0 + strength * delta.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import LoraflowError
from engine.lora.formats import KOHYA_UNET_LAYOUT_NAMES, kohya_module_path
from engine.lora.lycoris_file import NetworkModule, module_delta

_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": ("lora_te_", "lora_te1_"),
                 "text_encoder_2": ("lora_te2_",)}


class NetworkRefused(LoraflowError):
    """A LyCORIS file whose modules do not fit the model."""


@dataclass
class _Merged:
    layer: torch.nn.Module
    base: torch.Tensor  # the layer's own weight, fp32, CPU
    delta: torch.Tensor  # fp32, CPU


_MERGED: weakref.WeakKeyDictionary[Any, list[_Merged]] = weakref.WeakKeyDictionary()


def merge_network(pipe: Any, modules: Iterable[NetworkModule], strength: float,
                  where: str) -> None:
    """Merge every module of a LyCORIS file into ``pipe``'s layers at ``strength``."""
    modules = list(modules)
    layers: dict[str, dict[str, torch.nn.Module]] = {}
    merged, unplaced = [], []
    for module in modules:
        component = getattr(pipe, module.component, None)
        if component is None:
            raise NetworkRefused(f"{where} adapts {module.component} ({module.name}); this "
                                 "model has no such text encoder")
        if module.component not in layers:
            layers[module.component] = _layers_by_kohya_name(module.component, component)
        layer = layers[module.component].get(module.name)
        if layer is None:
            unplaced.append(module.name)
            continue
        base = layer.weight.detach().float().cpu().clone()
        try:
            delta = module_delta(module, base)
        except LoraflowError as exc:
            raise NetworkRefused(f"{where}: {exc}") from None
        merged.append(_Merged(layer, base, delta))
    if unplaced:
        raise NetworkRefused(f"{where}: {len(unplaced)} of its {len(modules)} modules are not "
                             f"layers of this model, e.g. {unplaced[0]}")
    _MERGED[pipe] = merged
    set_strength(pipe, strength)


def has_merged_network(pipe: Any) -> bool:
    return pipe in _MERGED


def set_strength(pipe: Any, strength: float) -> None:
    """Weights = base + ``strength`` * delta for every merged layer (0: the base model)."""
    with torch.no_grad():
        for item in _MERGED[pipe]:
            weight = item.layer.weight
            value = item.base if strength == 0 else item.base + float(strength) * item.delta
            weight.copy_(value.to(device=weight.device, dtype=weight.dtype))


def _layers_by_kohya_name(component: str, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{kohya module name: layer} for the layers with a weight, under each prefix the
    loaders accept (SDXL's ``add_embedding`` under both its spellings, as ComfyUI)."""
    prefixes = _KOHYA_PREFIX[component]
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    found: dict[str, torch.nn.Module] = {}
    for name, layer in model.named_modules():
        if not isinstance(getattr(layer, "weight", None), torch.Tensor) or not name:
            continue
        paths = {kohya_module_path(component, name)}
        if component == "unet" and name in KOHYA_UNET_LAYOUT_NAMES:
            paths.add(name.replace(".", "_"))
        for prefix in prefixes:
            for path in paths:
                found[prefix + path] = layer
    return found
