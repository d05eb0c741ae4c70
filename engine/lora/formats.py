"""LoRA key formats: diffusers/PEFT (what we train and save) and kohya (what travels).

The diffusers file (``pytorch_lora_weights.safetensors``) loads fully in diffusers only
(ComfyUI skips its UNet attention keys and ignores its alpha: see
:mod:`engine.lora.loaders`). ComfyUI and AUTOMATIC1111 map the kohya layout, one
``.safetensors`` with keys

* ``lora_unet_<diffusers UNet module path, dots as underscores>.lora_down.weight``
  (= PEFT ``lora_A``), ``.lora_up.weight`` (= ``lora_B``) and ``.alpha`` (a scalar);
  SDXL's ``add_embedding`` takes its original-layout name (:data:`KOHYA_UNET_LAYOUT_NAMES`);
* text encoders: ``lora_te_`` (SD 1.x / 2.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL)
  followed by the HF CLIP path ``text_model_encoder_layers_<N>_self_attn_q_proj``.

The converter is our own rather than diffusers' ``convert_state_dict_to_kohya`` because
that one writes ``alpha = rank`` (the LoRA then loads at the wrong strength whenever
alpha != rank) and names the SD 1.x text encoder ``lora_te1_``. diffusers'
``load_lora_weights`` reads kohya files itself (it converts ``lora_unet_``/``lora_te*_``
keys and scales by ``.alpha / rank``), so no kohya -> diffusers converter is needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.errors import LoraflowError

Format = Literal["diffusers", "kohya", "unknown"]

#: diffusers file component prefix -> kohya key prefix, per family.
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sd2": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}

KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
#: The LyCORIS tensors ComfyUI's weight adapters also read (see :mod:`engine.lora.lycoris`).
LYCORIS_SUFFIXES = (".dora_scale", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
                    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b")

#: UNet modules named in the kohya file by their original (LDM / sgm) layout name, not the
#: diffusers one. diffusers' kohya converter (0.42) strips the last ``.<digit>`` of every
#: name holding "emb" that it has not mapped first, so ``add_embedding_linear_1`` and
#: ``_2`` (SDXL) become one module and half the LoRA is dropped with a warning; it maps
#: ``label_emb.0.0`` / ``label_emb.0.2`` before that step. ComfyUI maps both spellings
#: (``lora_unet_`` + its own module names, and + the diffusers names of
#: ``comfy.utils.unet_to_diffusers``), A1111 finds ``diffusion_model_label_emb_0_0``.
#: Every other module family keeps the diffusers name, which all three map.
KOHYA_UNET_LAYOUT_NAMES: dict[str, str] = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(
    r"^(lora_unet_|lora_te[12]?_)([^.]+)(\.lora_down\.weight|\.lora_up\.weight|\.alpha)$"
)
#: The CLIP text-encoder modules ComfyUI maps, as kohya names them (N is the layer), and
#: the one more it maps for SDXL's second encoder (comfy/lora.py at commit 41444b5236c6).
_COMFY_TE_MODULE = re.compile(
    r"^text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc1|mlp_fc2)$"
)
_COMFY_TE2_EXTRA = ("text_projection",)
#: Top-level modules of a HF CLIP text model; kohya names them under ``text_model``.
_CLIP_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")


class LoraFormatError(LoraflowError):
    """A LoRA state dict that cannot be converted faithfully."""


# -- diffusers -> kohya ---------------------------------------------------------------


def diffusers_to_kohya(
    tensors: Mapping[str, torch.Tensor], family_name: str, alpha: float | Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """The kohya state dict of a diffusers/PEFT LoRA state dict, with the true alpha.

    ``alpha`` is one value for every module, or a mapping whose keys are a component
    (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``) or a full module name
    (``"unet.down_blocks.0....to_q"``); the module name wins over the component.
    Anything that is not a plain ``lora_A``/``lora_B`` pair (DoRA magnitudes, biases,
    old attention-processor keys) is refused: dropping it would change the LoRA.
    """
    prefixes = KOHYA_PREFIXES.get(family_name)
    if prefixes is None:
        raise LoraFormatError(f"unknown model family {family_name!r}")
    pairs = _lora_pairs(tensors)
    out: dict[str, torch.Tensor] = {}
    for (component, module), (down, up) in sorted(pairs.items()):
        if component not in prefixes:
            raise LoraFormatError(
                f"a {family_name} LoRA has no {component!r}: key {component}.{module}"
            )
        name = prefixes[component] + kohya_module_path(component, module)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        value = _alpha_for(alpha, component, module)
        out[f"{name}.alpha"] = torch.tensor(float(value), dtype=torch.float32)
    return out


def _lora_pairs(
    tensors: Mapping[str, torch.Tensor],
) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module) -> (lora_A, lora_B); refuses unknown keys and half pairs."""
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            raise LoraFormatError(
                f"not a diffusers/PEFT LoRA key: {key!r} (expected "
                "<unet|text_encoder|text_encoder_2>.<module>.lora_A|lora_B.weight)"
            )
        component, module, half = match.groups()
        halves.setdefault((component, module), {})[half] = tensor
    pairs = {}
    for where, found in halves.items():
        if set(found) != {"A", "B"}:
            raise LoraFormatError(f"LoRA module {'.'.join(where)} lacks lora_A or lora_B")
        if found["A"].shape[0] != found["B"].shape[1]:
            raise LoraFormatError(f"LoRA module {'.'.join(where)}: lora_A/lora_B ranks differ")
        pairs[where] = (found["A"], found["B"])
    return pairs


def kohya_module_path(component: str, module: str) -> str:
    """A diffusers module name as kohya writes it (dots -> underscores).

    Text encoders are named from the HF CLIP *model* (``text_model.encoder.layers...``),
    as kohya does; recent transformers flatten ``CLIPTextModel`` and diffusers then
    writes ``encoder.layers...`` without ``text_model.``, so it is put back. The UNet
    modules in :data:`KOHYA_UNET_LAYOUT_NAMES` take their original-layout name.
    """
    if component == "unet":
        module = KOHYA_UNET_LAYOUT_NAMES.get(module, module)
    elif module.startswith(_CLIP_TEXT_MODEL_CHILDREN):
        module = f"text_model.{module}"
    return module.replace(".", "_")


def _alpha_for(alpha: float | Mapping[str, float], component: str, module: str) -> float:
    if not isinstance(alpha, Mapping):
        return float(alpha)
    for key in (f"{component}.{module}", component):
        if key in alpha:
            return float(alpha[key])
    raise LoraFormatError(f"no alpha given for {component}.{module}")


def alphas_from_adapter_metadata(metadata: Mapping[str, str]) -> dict[str, float]:
    """Per-component alpha from a diffusers file's ``lora_adapter_metadata`` header.

    That header holds each component's PEFT ``LoraConfig``; it is what makes diffusers
    load the diffusers file at the right strength, so the kohya file takes its alpha
    from the same place. A per-module ``alpha_pattern`` is refused (we never write one,
    and ignoring it would silently change strengths).
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    config = json.loads(raw)
    alphas = {}
    for component in DIFFUSERS_COMPONENTS:
        if f"{component}.lora_alpha" not in config:
            continue
        if config.get(f"{component}.alpha_pattern"):
            raise LoraFormatError(f"{component}: per-module alpha_pattern is not supported")
        alphas[component] = float(config[f"{component}.lora_alpha"])
    return alphas


# -- detection ------------------------------------------------------------------------


def detect_format(keys: Iterable[str]) -> Format:
    """"diffusers", "kohya" or "unknown", from the keys (a state dict or its keys)."""
    names = list(keys)
    if not names:
        return "unknown"
    if all(_KOHYA_KEY.match(k) for k in names):
        return "kohya"
    if all(_DIFFUSERS_KEY.match(k) for k in names):
        return "diffusers"
    return "unknown"


# -- ComfyUI key check ----------------------------------------------------------------


def comfyui_unmapped_keys(
    kohya_tensors: Iterable[str], family: Any, unet_module_names: Iterable[str]
) -> list[str]:
    """Keys of a kohya LoRA that ComfyUI's documented key patterns would not map.

    ComfyUI builds its key map from the model: ``lora_unet_`` + each diffusers UNet
    module name with dots as underscores (or its original-layout name, for the modules
    of :data:`KOHYA_UNET_LAYOUT_NAMES`), and for CLIP ``lora_te_`` (SD 1.x/2.x) or
    ``lora_te1_``/``lora_te2_`` (SDXL) + ``text_model_encoder_layers_N_`` + one of the
    attention projections or MLP layers (and SDXL's ``lora_te2_text_projection``). A key
    outside that map is silently skipped by ComfyUI, so the LoRA loads weaker or not at
    all; this lists such keys. ``family`` is a :class:`engine.model.family.Family` or its
    name.
    """
    family_name = getattr(family, "name", family)
    te_prefixes = [p for c, p in KOHYA_PREFIXES[family_name].items() if c != "unet"]
    names = [name for name in unet_module_names if name]
    names += [KOHYA_UNET_LAYOUT_NAMES[name] for name in names if name in KOHYA_UNET_LAYOUT_NAMES]
    unet_names = {name.replace(".", "_") for name in names}
    keys = kohya_tensors.keys() if isinstance(kohya_tensors, Mapping) else kohya_tensors
    return [k for k in keys if not _comfyui_maps(k, te_prefixes, unet_names)]


def _comfyui_maps(key: str, te_prefixes: list[str], unet_names: set[str]) -> bool:
    module, dot, suffix = key.partition(".")
    if not dot or f".{suffix}" not in KOHYA_SUFFIXES + LYCORIS_SUFFIXES:
        return False
    if module.startswith("lora_unet_"):
        return module.removeprefix("lora_unet_") in unet_names
    for prefix in te_prefixes:
        if module.startswith(prefix):
            name = module.removeprefix(prefix)
            if prefix == "lora_te2_" and name in _COMFY_TE2_EXTRA:
                return True
            return bool(_COMFY_TE_MODULE.match(name))
    return False


# -- what a LoRA file holds -----------------------------------------------------------

#: Layer kinds a LoRA commonly targets, matched at the end of a module name whose dots
#: are underscores (both formats reduce to that), with their diffusers spelling.
_KINDS: dict[str, str] = {
    "to_out_0": "to_out.0",
    "ff_net_0_proj": "ff.net.0.proj",
    "ff_net_2": "ff.net.2",
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
    "label_emb_0_0": "linear_1",  # SDXL add_embedding in the kohya file
    "label_emb_0_2": "linear_2",
    **{k: k for k in (
        "to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj", "out_proj", "proj_in",
        "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv1",
        "conv2", "linear_1", "linear_2", "text_projection",
    )},
}
_KIND_RE = re.compile("(" + "|".join(sorted(_KINDS, key=len, reverse=True)) + ")$")
_KOHYA_COMPONENTS = {
    "lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
#: Cross-attention width (text embedding size) -> family, for the released models.
_CROSS_ATTENTION_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}
_ARCHITECTURE_FAMILY = {
    "stable-diffusion-xl-": "sdxl", "stable-diffusion-v2": "sd2", "stable-diffusion-v1": "sd1",
}
_BASE_VERSION_FAMILY = {"sdxl_": "sdxl", "sd_v2": "sd2", "sd_v1": "sd1"}


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer as a file describes it."""

    component: str  # unet | text_encoder | text_encoder_2
    name: str  # module name as written in the file (kohya: underscores)
    kind: str  # the layer kind in diffusers spelling, e.g. "to_out.0"
    rank: int
    alpha: float | None  # None: not stored; loaders then use alpha = rank
    in_features: int


def module_kind(name: str) -> str:
    flat = name.replace(".", "_")
    match = _KIND_RE.search(flat)
    return _KINDS[match.group(1)] if match else flat.rsplit("_", 1)[-1]


def lora_modules(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> list[LoraModule]:
    """The adapted modules of a diffusers or kohya state dict, sorted by name."""
    fmt = detect_format(tensors)
    if fmt == "kohya":
        return _kohya_modules(tensors)
    if fmt == "diffusers":
        alphas = alphas_from_adapter_metadata(metadata)
        return [
            LoraModule(component, module, module_kind(module), int(down.shape[0]),
                       alphas.get(component), int(down.shape[1]))
            for (component, module), (down, _) in sorted(_lora_pairs(tensors).items())
        ]
    raise LoraFormatError(
        f"neither a diffusers nor a kohya LoRA (e.g. key {next(iter(tensors), '<none>')!r})"
    )


def _kohya_modules(tensors: Mapping[str, torch.Tensor]) -> list[LoraModule]:
    modules = []
    for key in sorted(tensors):
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        prefix = _KOHYA_KEY.match(key).group(1)
        down = tensors[key]
        alpha = tensors.get(f"{name}.alpha")
        modules.append(LoraModule(
            _KOHYA_COMPONENTS[prefix], name, module_kind(name.removeprefix(prefix)),
            int(down.shape[0]), None if alpha is None else float(alpha.item()),
            int(down.shape[1]),
        ))
    return modules


def guess_family(
    keys: Iterable[str], modules: list[LoraModule], metadata: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(family name or "unknown", why): SDXL by its second text encoder or add_embedding,
    otherwise by the width of the cross-attention or text-encoder inputs; failing those,
    by what the header claims (``modelspec.architecture``, ``ss_base_model_version``)."""
    family, reason = _family_from_keys(list(keys), modules)
    if family == "unknown" and metadata:
        return _family_from_metadata(metadata) or (family, reason)
    return family, reason


def _family_from_metadata(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    architecture = metadata.get("modelspec.architecture", "")
    for prefix, family in _ARCHITECTURE_FAMILY.items():
        if architecture.startswith(prefix):
            return family, f"header modelspec.architecture {architecture}"
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in _BASE_VERSION_FAMILY.items():
        if version.startswith(prefix):
            return family, f"header ss_base_model_version {version}"
    return None


def _family_from_keys(names: list[str], modules: list[LoraModule]) -> tuple[str, str]:
    if any(m.component == "text_encoder_2" for m in modules):
        return "sdxl", "has a second text encoder"
    if any(k.startswith("lora_te1_") for k in names):
        return "sdxl", "kohya SDXL text-encoder names (lora_te1_)"
    if any("add_embedding" in m.name or "label_emb" in m.name for m in modules):
        return "sdxl", "adapts add_embedding (SDXL's added conditioning)"
    for m in modules:
        if m.component == "unet" and "attn2" in m.name and m.kind in ("to_k", "to_v"):
            family = _CROSS_ATTENTION_FAMILY.get(m.in_features)
            if family:
                return family, f"cross-attention input width {m.in_features}"
    for m in modules:
        if m.component == "text_encoder" and m.kind == "q_proj":
            family = _TEXT_WIDTH_FAMILY.get(m.in_features)
            if family:
                return family, f"text-encoder width {m.in_features}"
    return "unknown", "no SDXL-only modules and no known layer width"
