"""PEFT LoHa, LoKr, DoRA (and LoCon) adapters -> the kohya / LyCORIS file ComfyUI reads.

The checkpoint holds PEFT's state dict (``unet.<module>.hada_w1_a``, ``.lokr_w1``,
``.lora_magnitude_vector``); ComfyUI, A1111 and Forge read the LyCORIS layout, one module
per ``lora_unet_<module>`` / ``lora_te*_<module>`` name (as :mod:`engine.lora.formats`
spells it) with these tensors. Facts from ComfyUI's own source, ``comfy/lora.py``
(``load_lora``) and ``comfy/weight_adapter/``: ``loha.py`` at 17adbb5cacc2, ``lokr.py``
at 179c2d35c84b, ``lora.py`` at 0323d8746da9, ``base.py`` (``weight_decompose``) at
9c0cf36cd796:

* LoHa: ``hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b``, delta
  ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`` (rank = rows of ``w1_b``), reshaped to
  the weight. PEFT's factors have the same names, shapes and scale.
* LoKr: ``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b``; delta
  ``kron(w1, w2)`` (``w1`` given two trailing unit dims for a conv) times alpha / rank
  where a factor is decomposed, and times **1** where both are whole matrices. PEFT
  always scales by alpha / r, so for a module with two whole factors the scale is folded
  into ``lokr_w2`` and ``.alpha`` is written as the rank (as LyCORIS itself does).
* DoRA: ``lora_down/lora_up`` + ``.alpha`` as for LoRA, plus ``dora_scale``. ComfyUI
  scales along the output axis when ``dora_scale.shape[0]`` is the weight's output size
  (PEFT's orientation; the older ``(1, in)`` one of LyCORIS scales input columns, which
  PEFT's DoRA cannot be written as), dividing ``W0 + delta`` by the row norms of the
  *base* weight ``W0``. PEFT divides by the row norms of ``W0 + delta``. So
  ``dora_scale = m * ||W0|| / ||W0 + delta||`` (rows), shape ``(out, 1[, 1, 1])``: the
  weight ComfyUI builds is then PEFT's. Writing it needs the base weights.

``.alpha`` is written per module (LoCon's convolutions have their own), from the adapter
config in the checkpoint file's ``lora_adapter_metadata`` header.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from engine.lora.formats import KOHYA_PREFIXES, LoraFormatError, kohya_module_path

#: loraflow's adapter type -> the LyCORIS ``algo`` kohya's metadata names it by.
LYCORIS_ALGOS = {"loha": "loha", "lokr": "lokr", "dora": "lora"}

_PEFT_KEY = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A\.weight|lora_B\.weight"
    r"|lora_magnitude_vector|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$"
)
_KOHYA_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale"}

#: (component, module) -> the base weight of that module, fp32 (DoRA only).
BaseWeights = Callable[[str, str], torch.Tensor]


def adapter_kind(tensors: Mapping[str, torch.Tensor]) -> str:
    """"lora", "dora", "loha" or "lokr", from a PEFT state dict's tensor names."""
    names = "\n".join(tensors)
    if ".hada_w" in names:
        return "loha"
    if ".lokr_w" in names:
        return "lokr"
    return "dora" if ".lora_magnitude_vector" in names else "lora"


def peft_modules(tensors: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], dict]:
    """(component, module) -> {tensor name: tensor}; an unknown key is refused."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise LoraFormatError(f"not a PEFT LoRA/DoRA/LoHa/LoKr key: {key!r}")
        component, module, name = match.groups()
        modules.setdefault((component, module), {})[name] = tensor
    return modules


def module_alphas(metadata: Mapping[str, str]) -> Callable[[str, str], tuple[int, float]]:
    """(component, module) -> (rank, alpha) as PEFT used them: the config in the file's
    ``lora_adapter_metadata`` header, its ``rank_pattern`` / ``alpha_pattern`` matched the
    way PEFT matches them (a pattern is a suffix of the module name)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        raise LoraFormatError("the adapter file has no lora_adapter_metadata header")
    config = json.loads(raw)

    def lookup(component: str, module: str) -> tuple[int, float]:
        rank = config.get(f"{component}.r")
        alpha = config.get(f"{component}.lora_alpha", config.get(f"{component}.alpha"))
        if rank is None or alpha is None:
            raise LoraFormatError(f"no rank/alpha for {component} in the adapter header")
        rank = _pattern_value(config.get(f"{component}.rank_pattern") or {}, module, rank)
        alpha = _pattern_value(config.get(f"{component}.alpha_pattern") or {}, module, alpha)
        return int(rank), float(alpha)

    return lookup


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def peft_to_lycoris(
    tensors: Mapping[str, torch.Tensor], family_name: str, metadata: Mapping[str, str],
    base_weight: BaseWeights | None = None,
) -> dict[str, torch.Tensor]:
    """The kohya / LyCORIS state dict of a PEFT LoRA, DoRA, LoHa or LoKr state dict.

    ``base_weight`` gives the frozen weight of a module; DoRA needs it (see the module
    docstring), the other types do not.
    """
    prefixes = KOHYA_PREFIXES.get(family_name)
    if prefixes is None:
        raise LoraFormatError(f"unknown model family {family_name!r}")
    kind = adapter_kind(tensors)
    if kind == "dora" and base_weight is None:
        raise LoraFormatError("a DoRA needs the base model's weights to be written for ComfyUI")
    alphas = module_alphas(metadata)
    out: dict[str, torch.Tensor] = {}
    for (component, module), parts in sorted(peft_modules(tensors).items()):
        if component not in prefixes:
            raise LoraFormatError(f"a {family_name} LoRA has no {component!r}: {module}")
        name = prefixes[component] + kohya_module_path(component, module)
        rank, alpha = alphas(component, module)
        converted = dict(parts)
        if kind == "lokr" and not any(k.endswith(("_a", "_b")) for k in parts):
            converted["lokr_w2"] = parts["lokr_w2"] * (alpha / rank)  # ComfyUI scales by 1
            alpha = float(rank)
        if kind == "dora":
            converted["lora_magnitude_vector"] = dora_scale(
                parts, alpha / rank, base_weight(component, module)
            )
        for part, tensor in converted.items():
            out[f"{name}.{_KOHYA_NAMES.get(part, part)}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def dora_scale(parts: Mapping[str, torch.Tensor], scale: float,
               weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``dora_scale`` for PEFT's magnitude ``m``: ``m * ||W0|| / ||W0 + delta||``
    per output row, shaped ``(out, 1, ...)`` (the output-axis orientation)."""
    down = parts["lora_A.weight"].float()
    up = parts["lora_B.weight"].float()
    base = weight.float()
    delta = (up.flatten(1) @ down.flatten(1)).reshape(base.shape) * scale
    base_norm = base.flatten(1).norm(dim=1)
    merged_norm = (base + delta).flatten(1).norm(dim=1)
    magnitude = parts["lora_magnitude_vector"].float().flatten()
    return (magnitude * base_norm / merged_norm).reshape(-1, *[1] * (base.dim() - 1))


def needs_base_weights(tensors: Mapping[str, torch.Tensor]) -> bool:
    return adapter_kind(tensors) == "dora"


def module_weights(modules: Mapping[str, Any]) -> BaseWeights:
    """A :data:`BaseWeights` over loaded models, e.g. ``{"unet": unet, ...}``."""

    def weight(component: str, module: str) -> torch.Tensor:
        found = modules[component]
        name = module.removeprefix("text_model.") if component != "unet" else module
        try:
            layer = found.get_submodule(name)
        except AttributeError:
            layer = found.get_submodule(module)
        return layer.weight.detach().float()

    return weight
