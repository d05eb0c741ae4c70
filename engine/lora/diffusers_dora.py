"""The text-encoder DoRA magnitudes diffusers' ``load_lora_weights`` leaves out, put back.

Measured with diffusers 0.42.1, transformers 5.23.0 and peft 0.21.2 on a diffusers / PEFT
DoRA file (``<layer>.lora_magnitude_vector`` beside ``lora_A`` / ``lora_B``, the layout
peft's ``get_peft_model_state_dict`` writes):

* the UNet loads fully: diffusers places it with peft's ``set_peft_model_state_dict``,
  which turns ``lora_magnitude_vector`` into the parameter
  ``lora_magnitude_vector.<adapter>.weight``;
* a text encoder goes through transformers' ``load_adapter``, whose key renaming (peft's
  ``build_peft_weight_mapping``) inserts the adapter name only. The file's
  ``...lora_magnitude_vector.default_0`` then matches no parameter: transformers' load
  report lists it UNEXPECTED and ``...default_0.weight`` MISSING, and every layer keeps the
  magnitude PEFT initialised it with, the row norms of the base weight. ``lora_A`` /
  ``lora_B`` do load, so the encoder runs the trained direction at the untrained magnitude:
  neither the base model nor the trained one, and nothing but that report says so.

:func:`load_text_encoder_magnitudes` copies the file's magnitudes into the layers diffusers
built, after it has loaded the rest; where a version loads them itself this writes the
same values again. Keys are converted as diffusers converts them for the text encoder, so
a file in any layout diffusers reads lands on the layers diffusers chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from engine.errors import LoraflowError

MAGNITUDE = ".lora_magnitude_vector"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class DoraLoadError(LoraflowError):
    """A DoRA file's text-encoder magnitudes do not fit the model it was loaded into."""


def text_encoder_magnitudes(tensors: Mapping[str, torch.Tensor]
                            ) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {layer name as diffusers names it: magnitude}} of a diffusers-format file."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
    )

    found: dict[str, dict[str, torch.Tensor]] = {}
    for component in TEXT_ENCODERS:
        prefix = f"{component}."
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if not any(k.endswith(MAGNITUDE) for k in state):
            continue
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        found[component] = {k.removesuffix(MAGNITUDE): v for k, v in state.items()
                            if k.endswith(MAGNITUDE)}
    return found


def load_text_encoder_magnitudes(pipe: Any, tensors: Mapping[str, torch.Tensor],
                                 adapter_name: str, where: str) -> int:
    """Copy the file's text-encoder DoRA magnitudes into ``pipe``'s adapter ``adapter_name``
    (loaded by ``load_lora_weights``); returns how many layers got one."""
    placed = 0
    for component, magnitudes in text_encoder_magnitudes(tensors).items():
        encoder = getattr(pipe, component, None)
        if encoder is None:
            raise DoraLoadError(f"{where} has a DoRA for {component}; this model has none")
        layers = dict(encoder.named_modules())
        for name, value in sorted(magnitudes.items()):
            # transformers 5 names CLIP modules without text_model.; files keep it
            layer = layers.get(name, layers.get(name.removeprefix("text_model.")))
            vectors = getattr(layer, "lora_magnitude_vector", None)
            if vectors is None or adapter_name not in vectors:
                raise DoraLoadError(f"{where}: {component}.{name} has a DoRA magnitude and no "
                                    f"DoRA layer of adapter {adapter_name!r} was loaded there")
            weight = vectors[adapter_name].weight
            if tuple(weight.shape) != tuple(value.shape):
                raise DoraLoadError(f"{where}: {component}.{name}{MAGNITUDE} has shape "
                                    f"{tuple(value.shape)}, the layer {tuple(weight.shape)}")
            with torch.no_grad():
                weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
            placed += 1
    return placed
