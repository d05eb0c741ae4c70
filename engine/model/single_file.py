"""The single-file checkpoint: a diffusers model's weights in the original SD (LDM) key layout.

ComfyUI, A1111 and Forge load a whole model from one ``.safetensors`` file whose keys are
those of Stability's original code: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.*`` (SD 1.x/2.x text encoder) or
``conditioner.embedders.{0,1}.*`` (SDXL's two). This module renames diffusers' keys into
that layout. The facts (which block is which, the OpenCLIP names, the fused q/k/v, the
1x1-conv VAE attention) are those of diffusers' ``scripts/convert_diffusers_to_original_
stable_diffusion.py`` and ``convert_diffusers_to_original_sdxl.py``; unlike those scripts,
the block numbering here is computed from the UNet's and VAE's configs, so any depth
(the tiny test models, SD, SDXL) converts by the same rule. Tensors are never changed
in value, only renamed, reshaped (VAE attention) or joined (OpenCLIP q/k/v).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: Where each family's text encoders go, and whether they are in OpenAI CLIP (HF names
#: under ``transformer.``) or OpenCLIP (``model.``) layout.
TEXT_PREFIXES: dict[str, tuple[tuple[str, bool], ...]] = {
    "sd1": (("cond_stage_model.transformer.", False),),
    "sd2": (("cond_stage_model.model.", True),),
    "sdxl": (("conditioner.embedders.0.transformer.", False),
             ("conditioner.embedders.1.model.", True)),
}

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
           ("conv_shortcut", "skip_connection"))
_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}


class SingleFileError(ValueError):
    """A module has a key this layout has no place for (a model loraflow does not convert)."""


# -- UNet ------------------------------------------------------------------------------


def _unet_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers block prefix -> LDM block prefix, from the UNet's block types and depth."""
    per_block = config["layers_per_block"]
    n = len(config["block_out_channels"])
    up_types = config["up_block_types"]
    if not isinstance(per_block, int):
        raise SingleFileError("a UNet with per-block layer counts has no single-file layout here")
    out: dict[str, str] = {}
    for i in range(n):
        for j in range(per_block):
            ldm = (per_block + 1) * i + j + 1
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{ldm}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{ldm}.1."
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = (
                f"input_blocks.{(per_block + 1) * (i + 1)}.0.op.")
        has_attention = "CrossAttn" in up_types[i]
        for j in range(per_block + 1):
            ldm = (per_block + 1) * i + j
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{ldm}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{ldm}.1."
        if i < n - 1:
            last = (per_block + 1) * i + per_block
            out[f"up_blocks.{i}.upsamplers.0."] = (
                f"output_blocks.{last}.{2 if has_attention else 1}.")
    out["mid_block.resnets.0."] = "middle_block.0."
    out["mid_block.attentions.0."] = "middle_block.1."
    out["mid_block.resnets.1."] = "middle_block.2."
    return out


def unet_to_ldm(state: Mapping[str, torch.Tensor],
                config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in LDM names, without the ``model.diffusion_model.``."""
    blocks = _unet_prefixes(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out[_unet_key(key, blocks)] = value
    return out


def _unet_key(key: str, blocks: Mapping[str, str]) -> str:
    for hf, ldm in _UNET_TOP.items():
        if key.startswith(hf):
            return ldm + key[len(hf):]
    for hf, ldm in blocks.items():
        if key.startswith(hf):
            rest = key[len(hf):]
            if ".resnets." in hf:
                rest = _renamed(rest, _RESNET)
            return ldm + rest
    raise SingleFileError(f"UNet key {key!r} has no place in the original SD layout")


def _renamed(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    head, _, tail = rest.partition(".")
    for hf, ldm in pairs:
        if head == hf:
            return f"{ldm}.{tail}"
    return rest


# -- VAE -------------------------------------------------------------------------------

_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                  ("to_out", "proj_out"))


def vae_to_ldm(state: Mapping[str, torch.Tensor],
               config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM names (attention as 1x1 convolutions)."""
    n = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _vae_key(key, n)
        if ".mid.attn_1." in f".{new}" and new.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def _vae_key(key: str, n: int) -> str:
    part, _, rest = key.partition(".")  # encoder | decoder | quant_conv | post_quant_conv
    if part not in ("encoder", "decoder"):
        return key
    rest = rest.replace("conv_norm_out.", "norm_out.")
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)",
                     rest):
        kind, index, what, j, tail = m.groups()
        level = int(index) if kind == "down" else n - 1 - int(index)
        if what == "resnets":
            rest = f"{kind}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        else:
            rest = f"{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"
    elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        j, tail = m.groups()
        rest = f"mid.block_{int(j) + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
    elif rest.startswith("mid_block.attentions.0."):
        tail = rest[len("mid_block.attentions.0."):]
        rest = "mid.attn_1." + _renamed(tail.replace("to_out.0.", "to_out."), _VAE_ATTENTION)
    return f"{part}.{rest}"


# -- text encoders ---------------------------------------------------------------------


def _hf_clip_key(key: str) -> str:
    """transformers 5 names CLIP keys without ``text_model.``; files always have it."""
    if key.startswith(("text_model.", "text_projection.")):
        return key
    return f"text_model.{key}"


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): the transformers names, as they are."""
    return {_hf_clip_key(k): v for k, v in state.items()
            if not k.endswith("position_ids")}


_OPENCLIP = (("text_model.encoder.layers.", "transformer.resblocks."),
             ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."),
             (".fc2.", ".c_proj."), (".self_attn.", ".attn."))
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def openclip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SD 2.x, SDXL's second encoder): q/k/v joined as ``in_proj``, the
    projection stored transposed (OpenCLIP multiplies ``x @ text_projection``)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for raw, value in state.items():
        key = _hf_clip_key(raw)
        if key.endswith("position_ids"):
            continue
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        if m := re.match(r"(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$", key):
            stem, which, kind = m.groups()
            qkv.setdefault(stem, {}).setdefault(kind, {})[which] = value
            continue
        for hf, ldm in _OPENCLIP:
            key = key.replace(hf, ldm)
        out[key] = value
    for hf_stem, kinds in qkv.items():
        stem = hf_stem.replace("text_model.encoder.layers.", "transformer.resblocks.")
        stem = stem.replace(".self_attn", ".attn")
        for kind, parts in kinds.items():
            if set(parts) != {"q", "k", "v"}:
                raise SingleFileError(f"text encoder {stem}: q, k and v are not all there")
            out[f"{stem}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# -- the whole file --------------------------------------------------------------------


def single_file_state(family: str, unet: Any, vae: Any,
                      text_encoders: list[Any]) -> dict[str, torch.Tensor]:
    """Every weight of the model in the original SD layout, keys sorted, contiguous."""
    state = {UNET_PREFIX + k: v for k, v in
             unet_to_ldm(unet.state_dict(), unet.config).items()}
    state |= {VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    for (prefix, is_openclip), encoder in zip(TEXT_PREFIXES[family], text_encoders,
                                              strict=True):
        converted = (openclip_to_ldm if is_openclip else clip_to_ldm)(encoder.state_dict())
        state |= {prefix + k: v for k, v in converted.items()}
    return {k: state[k].detach().cpu().contiguous() for k in sorted(state)}
