"""Every module family a user can target loads from the kohya file in diffusers and ComfyUI.

A LoRA here adapts every Linear and Conv2d layer of the UNet (attention, feed-forward,
proj_in/out, resnet convs, time_emb_proj, samplers, conv_in/out, time and add embeddings)
and the text encoders' attention, MLP and (SDXL) text projection, with alpha != rank, on
tiny-sd1, tiny-sd2 and tiny-sdxl. diffusers' own ``load_lora_weights`` reads the kohya
file into a fresh pipeline exactly as it reads the diffusers file, with no warning about
keys it could not place; and each kohya key is one of those ComfyUI's key map holds.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.lora.formats import comfyui_unmapped_keys, kohya_module_path, lora_modules
from engine.lora.loaders import COMFYUI, DIFFUSERS, tool_support
from tests.engine.lora.test_formats import (
    ALPHA,
    RANK,
    MadeLora,
    load_pipeline_with,
    make_lora,
    text_output,
    unet_output,
)

TEXT_ALPHA = 8.0  # != RANK and != the UNet's ALPHA: a mix-up of the two shows

#: Every UNet Linear / Conv2d family a ``lora.target_modules`` regex can reach.
UNET_FAMILIES = {
    "attention": r"attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "feed-forward": r"ff\.net\.(0\.proj|2)",
    "proj_in/out": r"attentions\.\d+\.(proj_in|proj_out)",
    "resnet convs": r"resnets\.\d+\.(conv1|conv2|conv_shortcut)",
    "time_emb_proj": r"resnets\.\d+\.time_emb_proj",
    "samplers": r"(downsamplers|upsamplers)\.0\.conv",
    "conv_in/out": r"conv_(in|out)",
    "time embedding": r"time_embedding\.linear_[12]",
    "add embedding": r"add_embedding\.linear_[12]",  # SDXL only
}
WIDE_UNET_REGEX = r"^(.*\.)?(" + "|".join(f"(?:{p})" for p in UNET_FAMILIES.values()) + ")$"
WIDE_TEXT_REGEX = r"^(.*\.)?(q_proj|k_proj|v_proj|out_proj|fc1|fc2|text_projection)$"

# -- ComfyUI's key map ------------------------------------------------------------------
# Patterns of the kohya keys ComfyUI maps, read from ComfyUI's source at commit
# 41444b5236c613ee5ff7d09aa620f94b702f30eb (comfyanonymous/ComfyUI): comfy/lora.py
# model_lora_keys_unet ("lora_unet_" + each diffusers key of comfy/utils.py
# unet_to_diffusers, dots as underscores, and + each of its own UNet weight names) and
# model_lora_keys_clip (LORA_CLIP_MAP per layer; "lora_te_"/"lora_te1_" for clip_l/clip_h,
# "lora_te2_" for clip_g next to clip_l; lora_te2_text_projection). load_lora reads
# "<key>.lora_up.weight", "<key>.lora_down.weight" and "<key>.alpha" (scale alpha / rank).
_BLOCK = r"(down_blocks_\d+|mid_block|up_blocks_\d+)"
COMFYUI_UNET = [
    rf"{_BLOCK}_attentions_\d+_transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)",
    rf"{_BLOCK}_attentions_\d+_transformer_blocks_\d+_ff_net_(0_proj|2)",
    rf"{_BLOCK}_attentions_\d+_(proj_in|proj_out)",
    rf"{_BLOCK}_resnets_\d+_(conv1|conv2|conv_shortcut|time_emb_proj)",
    r"down_blocks_\d+_downsamplers_0_conv",
    r"up_blocks_\d+_upsamplers_0_conv",
    r"conv_in", r"conv_out", r"time_embedding_linear_[12]",
]
COMFYUI_UNET_SDXL = [r"label_emb_0_[02]", r"add_embedding_linear_[12]"]
COMFYUI_CLIP = r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc1|mlp_fc2)"
COMFYUI_TE_PREFIXES = {
    "sd1": {"lora_te_": [COMFYUI_CLIP]},
    "sd2": {"lora_te_": [COMFYUI_CLIP]},
    "sdxl": {"lora_te1_": [COMFYUI_CLIP], "lora_te2_": [COMFYUI_CLIP, "text_projection"]},
}
KOHYA_SUFFIX = r"\.(lora_down\.weight|lora_up\.weight|alpha)"


def comfyui_key_pattern(family: str) -> re.Pattern[str]:
    unet = COMFYUI_UNET + (COMFYUI_UNET_SDXL if family == "sdxl" else [])
    names = [f"lora_unet_({'|'.join(unet)})"]
    for prefix, modules in COMFYUI_TE_PREFIXES[family].items():
        names.append(f"{prefix}({'|'.join(modules)})")
    return re.compile(f"^({'|'.join(names)}){KOHYA_SUFFIX}$")


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def wide_lora(request: pytest.FixtureRequest) -> MadeLora:
    location = request.getfixturevalue(f"tiny_{request.param}")
    return make_lora(
        location, request.param, text_encoders=True, seed=3,
        unet_targets=WIDE_UNET_REGEX, text_targets=WIDE_TEXT_REGEX, text_alpha=TEXT_ALPHA,
    )


@pytest.fixture
def diffusers_warnings() -> Iterator[list[str]]:
    """Warnings diffusers logs or raises while a test runs (its logger does not propagate)."""
    from diffusers.utils import logging as diffusers_logging

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = Collect()
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    root.removeHandler(handler)
    seen.extend(str(w.message) for w in caught)


def _module_names(made: MadeLora) -> set[str]:
    return {k.removesuffix(".lora_A.weight") for k in made.tensors if k.endswith("lora_A.weight")}


# -- the LoRA really covers every family ---------------------------------------------------


def test_the_wide_lora_adapts_every_family(wide_lora: MadeLora):
    names = _module_names(wide_lora)
    for family, pattern in UNET_FAMILIES.items():
        found = [n for n in names if n.startswith("unet.") and re.search(f"{pattern}$", n)]
        if family == "add embedding" and wide_lora.family != "sdxl":
            assert not found
            continue
        assert found, f"{wide_lora.family}: no {family} module adapted"
    for kind in ("q_proj", "out_proj", "fc1", "fc2"):
        assert any(n.startswith("text_encoder.") and n.endswith(kind) for n in names)
    if wide_lora.family == "sdxl":
        assert "text_encoder_2.text_projection" in names


# -- diffusers ------------------------------------------------------------------------------


def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(
    wide_lora: MadeLora, diffusers_warnings: list[str]
):
    """Fresh pipelines with each file give the same UNet and text-encoder outputs (and the
    trained model's), hold the same LoRA tensors, and diffusers warns about nothing."""
    from peft.utils import get_peft_model_state_dict

    loaded = {
        name: load_pipeline_with(wide_lora.location, wide_lora.family, data)
        for name, data in (("diffusers", wide_lora.diffusers_bytes),
                           ("kohya", wide_lora.kohya_bytes()))
    }
    assert diffusers_warnings == []
    trained_unet = unet_output(wide_lora.unet)
    for pipe in loaded.values():
        torch.testing.assert_close(unet_output(pipe.unet), trained_unet)
        for name, trained in wide_lora.text_encoders.items():
            torch.testing.assert_close(text_output(getattr(pipe, name)), text_output(trained))

    for component in ("unet", *wide_lora.text_encoders):
        models = [getattr(pipe, component) for pipe in loaded.values()]
        states = [get_peft_model_state_dict(m, adapter_name=next(iter(m.peft_config)))
                  for m in models]
        assert states[0].keys() == states[1].keys()
        for key in states[0]:
            assert torch.equal(states[0][key], states[1][key]), f"{component}.{key}"


def test_sdxl_add_embedding_takes_the_layout_name_both_loaders_map():
    """diffusers' kohya converter collapses add_embedding_linear_1/_2 into one module."""
    assert kohya_module_path("unet", "add_embedding.linear_1") == "label_emb_0_0"
    assert kohya_module_path("unet", "add_embedding.linear_2") == "label_emb_0_2"
    # every other family keeps its diffusers name
    assert kohya_module_path("unet", "time_embedding.linear_1") == "time_embedding_linear_1"
    assert kohya_module_path("unet", "conv_in") == "conv_in"


# -- ComfyUI -------------------------------------------------------------------------------


def test_every_kohya_key_matches_comfyuis_key_map(wide_lora: MadeLora):
    from diffusers import UNet2DConditionModel

    kohya = load_tensors(wide_lora.kohya_bytes())
    pattern = comfyui_key_pattern(wide_lora.family)
    assert [k for k in kohya if not pattern.match(k)] == []
    base = UNet2DConditionModel.from_pretrained(wide_lora.location, subfolder="unet")
    names = [name for name, _ in base.named_modules()]
    assert comfyui_unmapped_keys(kohya, wide_lora.family, names) == []
    assert len(kohya) == 3 * len(wide_lora.tensors) // 2


def test_kohya_alphas_are_per_component_with_alpha_not_rank(wide_lora: MadeLora):
    """ComfyUI scales each module by its own ``.alpha`` / rank: UNet 2/4, encoders 8/4."""
    kohya = load_tensors(wide_lora.kohya_bytes())
    for key, value in kohya.items():
        if key.endswith(".alpha"):
            want = ALPHA if key.startswith("lora_unet_") else TEXT_ALPHA
            assert value.item() == want, key
        elif key.endswith(".lora_down.weight"):
            assert value.shape[0] == RANK, key


def test_inspect_verdict_matches_what_the_loaders_do(wide_lora: MadeLora):
    kohya = load_tensors(wide_lora.kohya_bytes())
    verdict = tool_support("kohya", wide_lora.family, lora_modules(kohya, {}))
    assert verdict.loads_fully_in == (DIFFUSERS, COMFYUI)
