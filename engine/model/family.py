"""Model families: what differs between SD 1.x, SD 2.x and SDXL, in one seam.

The training loop never asks which family it runs; it asks the family to turn captions
into conditioning and to build the UNet's extra inputs. The family is read from the
model itself (model_index.json and the UNet config), never guessed from its name.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import LoraflowError
from engine.model.new_tokens import spelled_out

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}


class UnsupportedModelError(LoraflowError):
    """The model is not an SD 1.x / 2.x / SDXL diffusers model."""


@dataclass(frozen=True)
class Family:
    """What a family needs: its text encoders, its pipeline, its metadata names."""

    name: str  # "sd1" | "sd2" | "sdxl"
    pipeline_class: str
    text_encoders: tuple[tuple[str, str], ...]  # (tokenizer subfolder, encoder subfolder)
    default_prediction_type: str

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    @property
    def modelspec_architecture(self) -> str:
        """Stability's model-spec architecture id for a LoRA of this family."""
        if self.name == "sdxl":
            return "stable-diffusion-xl-v1-base/lora"
        if self.name == "sd2":
            return (
                "stable-diffusion-v2-768-v/lora"
                if self.default_prediction_type == "v_prediction"
                else "stable-diffusion-v2-512/lora"
            )
        return "stable-diffusion-v1/lora"

    @property
    def kohya_base_model_version(self) -> str:
        return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[self.name]


def detect_family(model_index: dict[str, Any], unet_config: dict[str, Any],
                  scheduler_config: dict[str, Any]) -> Family:
    """Decide the family from the model's own files; refuse what we cannot train."""
    found = model_index.get("_class_name", "<missing _class_name>")
    kind = SUPPORTED_PIPELINES.get(found)
    if kind is None:
        raise UnsupportedModelError(
            f"model is a {found}; loraflow trains LoRA for StableDiffusionPipeline (SD 1.x, "
            "SD 2.x) and StableDiffusionXLPipeline (SDXL) models"
        )
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if kind == "sdxl":
        return Family(
            "sdxl",
            found,
            (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
            prediction,
        )
    # SD 2.x: OpenCLIP-H text encoder (1024) and linear transformer projections.
    is_v2 = unet_config.get("cross_attention_dim") == 1024 or bool(
        unet_config.get("use_linear_projection")
    )
    return Family(
        "sd2" if is_v2 else "sd1", found, (("tokenizer", "text_encoder"),), prediction
    )


# -- conditioning ---------------------------------------------------------------------


#: Token ids already computed, per tokenizer (weakly: a freed tokenizer takes its ids
#: along) and caption. Tokenizing is pure string work (~0.6 ms a caption, a twentieth of a
#: tiny step) and gives the same ids every time, so remembering them changes no bit.
_TOKEN_IDS: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()
_TOKEN_IDS_PER_TOKENIZER = 8192  # shuffled tags make captions without end: stay bounded
#: The vocabulary size the ids of _TOKEN_IDS were computed at: added tokens
#: (engine/model/new_tokens.py) change a caption's ids, so its remembered ones are dropped.
_VOCAB_SIZES: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids [B, max_length] of ``captions``, each padded and truncated on its own (as
    a batch call does with ``padding="max_length"``)."""
    if _VOCAB_SIZES.get(tokenizer) != (size := len(tokenizer)):
        _TOKEN_IDS.pop(tokenizer, None)
        _VOCAB_SIZES[tokenizer] = size
    known = _TOKEN_IDS.setdefault(tokenizer, {})
    missing = [c for c in dict.fromkeys(captions) if c not in known]
    if missing:
        if len(known) + len(missing) > _TOKEN_IDS_PER_TOKENIZER:
            known.clear()
            missing = list(dict.fromkeys(captions))
        ids = tokenizer(
            [spelled_out(tokenizer, c) for c in missing],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        known.update(zip(missing, ids, strict=True))
    return torch.stack([known[c] for c in captions])


def encode_captions(
    family: Family, tokenizers: list[Any], encoders: list[Any], captions: list[str],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Caption conditioning: {"prompt_embeds": [B, 77, D]} (+ "pooled" for SDXL).

    SD 1.x/2.x use the encoder's last hidden state (SD 2.x checkpoints already drop the
    last OpenCLIP layer). SDXL concatenates both encoders' penultimate hidden states and
    takes the pooled projection of the second.
    """
    if not family.is_sdxl:
        ids = tokenize(tokenizers[0], captions).to(device)
        return {"prompt_embeds": encoders[0](ids, return_dict=False)[0]}
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=False):
        ids = tokenize(tokenizer, captions).to(device)
        out = encoder(ids, output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}


def sdxl_time_ids(
    original_sizes: list[tuple[int, int]],
    crops_top_left: list[tuple[int, int]],
    target_size: tuple[int, int],
) -> torch.Tensor:
    """SDXL micro-conditioning per sample: (orig h, orig w, crop top, crop left, h, w)."""
    rows = [[*o, *c, *target_size] for o, c in zip(original_sizes, crops_top_left, strict=False)]
    return torch.tensor(rows, dtype=torch.float32)


def unet_extra_inputs(
    family: Family, conditioning: dict[str, torch.Tensor], time_ids: torch.Tensor | None
) -> dict[str, Any]:
    """The UNet's keyword inputs beyond (latents, timesteps)."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": conditioning["prompt_embeds"]}
    if family.is_sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": conditioning["pooled"],
            "time_ids": time_ids,
        }
    return kwargs
