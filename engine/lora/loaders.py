"""Which tools load a LoRA file fully, told from its keys alone (``loraflow inspect``).

Two published files look alike to a user and are not: the diffusers file loads fully only
in diffusers, the kohya file in diffusers and ComfyUI. The verdict here is what
``inspect`` prints, so nobody has to learn it by a LoRA that loads half-strength.

Facts from each loader's own source, pinned so that a change upstream is a change here:

* ComfyUI, ``comfy/lora.py`` (``model_lora_keys_unet``, ``model_lora_keys_clip``) and
  ``comfy/utils.py`` (``unet_to_diffusers``) at commit ``41444b5236c6``: a kohya UNet key
  loads when its module is a diffusers name of ``unet_to_diffusers`` (attention q/k/v/out,
  feed-forward, proj_in/out, resnet conv1/conv2/conv_shortcut/time_emb_proj, samplers,
  conv_in/out, time and add embeddings) or ComfyUI's own layout name (SDXL ``label_emb``);
  CLIP keys are ``lora_te_``/``lora_te1_``/``lora_te2_`` + ``text_model_encoder_layers_N_``
  + q/k/v/out_proj or mlp_fc1/fc2, and SDXL's ``lora_te2_text_projection``. It reads
  ``.alpha`` per module. A diffusers/PEFT file has no ``.alpha`` tensors (its alpha is in
  the header, which ComfyUI does not read), so ComfyUI applies it at scale 1; and its UNet
  attention keys (``unet.<...>.attn1.to_q.lora_A``) are not in the map, which has only the
  old ``attn1.processor.to_q`` spelling, nor is ``text_encoder_2.text_projection``, so
  ComfyUI skips them.
* diffusers 0.42 (``_convert_non_diffusers_lora_to_diffusers``): maps all of the kohya names
  above except ``lora_unet_add_embedding_linear_1``/``_2``, which collapse into one module;
  loraflow writes those as ``label_emb_0_0``/``_0_2``
  (:data:`engine.lora.formats.KOHYA_UNET_LAYOUT_NAMES`). Older converters (upstream at
  commit ed6847a1, for one) also miss conv_in/out and the time and add embeddings under
  any spelling; the verdict is for 0.42, the version the tests load with.
* AUTOMATIC1111 / Forge read the kohya layout; their key maps are not checked here.
* LyCORIS files (:func:`file_support`): ComfyUI reads LoHa, LoKr and DoRA
  (``comfy/weight_adapter/``, see :mod:`engine.lora.lycoris`) and ``bundle_emb``
  (``comfy/sd1_clip.py``); A1111 / Forge have ``network_hada.py`` / ``network_lokr.py``
  and read ``bundle_emb`` (``networks.py``), key maps not checked. diffusers 0.42.1
  refuses a LoHa / LoKr kohya file of SD 1.x / 2.x / SDXL ("The following keys have not
  been correctly renamed"; its LoKr converters are for Z-Image and Flux 2 only; the
  request is huggingface/diffusers#3087, the symptom KohakuBlueleaf/LyCORIS#270), drops
  a kohya DoRA's ``dora_scale`` with a warning, and refuses ``bundle_emb`` keys (they
  have no ``lora`` in them). ``loraflow generate`` loads all of these itself.
* A diffusers / PEFT DoRA file that adapts a text encoder: diffusers 0.42.1 with
  transformers 5.23 loads the UNet fully but leaves each text-encoder layer's magnitude at
  its untrained value (transformers' ``load_adapter`` does not place
  ``lora_magnitude_vector``; :mod:`engine.lora.diffusers_dora`), with no error.
  ``loraflow generate`` and loraflow's validation put the magnitudes back.

The diffusers file cannot be changed to load fully in ComfyUI without breaking diffusers
(measured with 0.42): per-layer ``.alpha`` tensors make diffusers refuse the file
("Invalid LoRA checkpoint"), and the legacy ``attn1.processor.to_q_lora.down`` spelling
ComfyUI maps is converted by diffusers only when the file's first UNet key has it, so a
LoRA that also adapts conv_in or proj_in then loads wrong, silently. Folding alpha / rank
into ``lora_B`` would change the trained tensors. The kohya file is the one for ComfyUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.lora.formats import LoraModule

DIFFUSERS = "diffusers"
COMFYUI = "ComfyUI"
A1111 = "AUTOMATIC1111 / Forge"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "loraflow_*.safetensors"

_BLOCK = r"(?:down_blocks_\d+|mid_block|up_blocks_\d+)"
#: UNet modules (kohya spelling, after ``lora_unet_``) in ComfyUI's map for every family.
_COMFY_UNET = re.compile(
    rf"^(?:{_BLOCK}_attentions_\d+_(?:proj_in|proj_out"
    r"|transformer_blocks_\d+_(?:attn[12]_(?:to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
    rf"|{_BLOCK}_resnets_\d+_(?:conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|down_blocks_\d+_downsamplers_0_conv|up_blocks_\d+_upsamplers_0_conv"
    r"|conv_in|conv_out|time_embedding_linear_[12])$"
)
#: ... and those only SDXL has (its added-conditioning MLP, under both spellings).
_COMFY_UNET_SDXL = re.compile(r"^(?:add_embedding_linear_[12]|label_emb_0_[02])$")
#: Kohya UNet modules diffusers' kohya converter merges into one (see the module docstring).
_DIFFUSERS_COLLAPSES = re.compile(r"^add_embedding_linear_[12]$")
_COMFY_CLIP = re.compile(
    r"^text_model_encoder_layers_\d+_(?:self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$"
)
#: PEFT-form UNet attention modules of a diffusers file, which ComfyUI does not map.
_PEFT_UNET_ATTENTION = re.compile(r"\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)$")


@dataclass(frozen=True)
class ToolSupport:
    """Which tools load every module of a file, and what to do for the others."""

    loads_fully_in: tuple[str, ...]
    elsewhere: str


def tool_support(fmt: str, family: str, modules: list[LoraModule]) -> ToolSupport:
    """The verdict for a ``"diffusers"`` or ``"kohya"`` file of ``family`` (or "unknown")."""
    if fmt == "diffusers":
        return _diffusers_file(modules)
    return _kohya_file(family, modules)


def _diffusers_file(modules: list[LoraModule]) -> ToolSupport:
    skipped = [m for m in modules if _comfyui_skips_peft(m)]
    why = []
    if skipped:
        what = " and ".join(sorted(
            {"UNet attention" if m.component == "unet" else "text projection" for m in skipped}
        ))
        why.append(f"skips {len(skipped)} of this file's {len(modules)} modules ({what})")
    scales = {round(m.alpha / m.rank, 6) for m in modules if m.alpha is not None}
    if scales - {1.0}:
        why.append("applies it at scale 1, not alpha / rank")
    detail = f"; ComfyUI {' and '.join(why)}" if why else ""
    return ToolSupport(
        (DIFFUSERS,), f"{COMFYUI} / {A1111}: use the kohya file {KOHYA_FILE}{detail}"
    )


def _comfyui_skips_peft(module: LoraModule) -> bool:
    """A diffusers-file module ComfyUI's map lacks: PEFT-form UNet attention, and the
    text projection (its ``text_encoder.text_projection`` entry is commented out)."""
    if module.component == "unet":
        return bool(_PEFT_UNET_ATTENTION.search(module.name))
    return module.name.endswith("text_projection")


def _kohya_file(family: str, modules: list[LoraModule]) -> ToolSupport:
    unchecked = [m.name for m in modules if not _comfyui_maps(m, family)]
    collapsing = [m.name for m in modules if _diffusers_collapses(m)]
    if unchecked:
        shown = ", ".join(unchecked[:3]) + (", ..." if len(unchecked) > 3 else "")
        return ToolSupport(
            (), f"not known: {len(unchecked)} modules outside the names checked ({shown})"
        )
    if collapsing:
        return ToolSupport(
            (COMFYUI,),
            f"{DIFFUSERS}: use the diffusers file ({DIFFUSERS_FILE}); its kohya converter "
            f"merges {', '.join(collapsing)} into one module",
        )
    return ToolSupport((DIFFUSERS, COMFYUI), f"{A1111}: reads this format (not checked key by key)")


def _comfyui_maps(module: LoraModule, family: str) -> bool:
    name = _without_prefix(module.name)
    sdxl = family in ("sdxl", "unknown")
    if module.component == "unet":
        return bool(_COMFY_UNET.match(name) or (sdxl and _COMFY_UNET_SDXL.match(name)))
    if module.component == "text_encoder_2":
        return sdxl and (name == "text_projection" or bool(_COMFY_CLIP.match(name)))
    return bool(_COMFY_CLIP.match(name))


def _diffusers_collapses(module: LoraModule) -> bool:
    return module.component == "unet" and bool(
        _DIFFUSERS_COLLAPSES.match(_without_prefix(module.name))
    )


def _without_prefix(name: str) -> str:
    """A kohya module name without its ``lora_unet_`` / ``lora_te*_`` prefix."""
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"):
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


#: What diffusers does with a kohya file of each LyCORIS algorithm (measured, 0.42.1).
_DIFFUSERS_LYCORIS = {
    "loha": "load_lora_weights refuses LoHa files",
    "lokr": "load_lora_weights refuses LoKr files of SD 1.x / 2.x / SDXL",
    "dora": "load_lora_weights drops dora_scale (a plain LoRA, not the DoRA)",
}

#: ... and with a diffusers / PEFT DoRA file's text encoders (measured, see the docstring).
_DIFFUSERS_DORA_TEXT = ("load_lora_weights leaves the text encoders' DoRA magnitudes "
                        "untrained (loraflow generate loads them)")


def file_support(fmt: str, family: str, modules: list[LoraModule], algorithm: str = "lora",
                 bundled: bool = False) -> ToolSupport:
    """:func:`tool_support`, knowing the file's LyCORIS ``algorithm`` (lora, locon, dora,
    loha, lokr) and whether it bundles new-token embeddings (``bundle_emb``)."""
    support = tool_support(fmt, family, modules)
    if fmt == "diffusers" and algorithm == "dora" and any(m.component != "unet" for m in modules):
        return ToolSupport((), f"{DIFFUSERS}: {_DIFFUSERS_DORA_TEXT}; {support.elsewhere}")
    if fmt != "kohya" or (algorithm not in _DIFFUSERS_LYCORIS and not bundled):
        return support
    notes = [n for n in (_DIFFUSERS_LYCORIS.get(algorithm),
                         "load_lora_weights refuses bundle_emb keys" if bundled else None) if n]
    tools = tuple(t for t in support.loads_fully_in if t != DIFFUSERS)
    if not support.loads_fully_in and support.elsewhere.startswith("not known"):
        return ToolSupport((), f"{support.elsewhere}; {DIFFUSERS}: {'; '.join(notes)}")
    a1111 = {"loha": "reads LoHa", "lokr": "reads LoKr"}.get(algorithm, "reads this format")
    if bundled:
        a1111 += " and bundle_emb"
    checked = "dora_scale and keys not checked" if algorithm == "dora" else "not checked key by key"
    return ToolSupport(
        tools, f"{DIFFUSERS}: {'; '.join(notes)} (loraflow generate loads it); "
               f"{A1111}: {a1111} ({checked})",
    )
