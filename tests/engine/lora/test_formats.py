"""The kohya file loads in diffusers exactly like the diffusers file, at the true alpha,
and every key it has is one ComfyUI maps.

LoRAs here have rank 4 and alpha 2 (scale 0.5), so a writer that put alpha = rank in the
kohya file (diffusers' own converter does) would load at double strength and fail.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.lora.formats import (
    LoraFormatError,
    alphas_from_adapter_metadata,
    comfyui_unmapped_keys,
    detect_format,
    diffusers_to_kohya,
)
from engine.lora.metadata import read_metadata, write_lora_file
from engine.lora.weights import lora_file_bytes

RANK, ALPHA = 4, 2.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class MadeLora:
    """An adapted model in memory and the diffusers file saved from it."""

    family: str
    location: str
    unet: Any
    text_encoders: dict[str, Any]
    diffusers_bytes: bytes

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.diffusers_bytes)

    def kohya_bytes(self) -> bytes:
        """The kohya file, alpha per component from the diffusers file's header (as publish)."""
        alphas = alphas_from_adapter_metadata(read_metadata(self.diffusers_bytes))
        return write_lora_file(diffusers_to_kohya(self.tensors, self.family, alphas), {})


def _randomise_lora(module: Any, generator: torch.Generator) -> None:
    """PEFT starts lora_B at zero (no effect); random values make every layer count."""
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def make_lora(
    location: str,
    family: str,
    *,
    text_encoders: bool,
    seed: int = 0,
    unet_targets: list[str] | str = UNET_TARGETS,
    text_targets: list[str] | str = TEXT_TARGETS,
    text_alpha: float = ALPHA,
) -> MadeLora:
    """A rank-4 LoRA (alpha 2; ``text_alpha`` on the text encoders) with random weights on
    the UNet (and text encoders); targets are PEFT ``target_modules`` (list or regex)."""
    import peft
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet")
    unet.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=unet_targets))
    _randomise_lora(unet, generator)
    encoders: dict[str, Any] = {}
    if text_encoders:
        names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
        for name in names:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            encoder = cls.from_pretrained(location, subfolder=name)
            encoder.add_adapter(
                peft.LoraConfig(r=RANK, lora_alpha=text_alpha, target_modules=text_targets)
            )
            _randomise_lora(encoder, generator)
            encoders[name] = encoder
    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    data = lora_file_bytes(pipeline, unet, encoders)
    return MadeLora(family, location, unet, encoders, data)


def unet_inputs(unet: Any) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(1)
    config = unet.config
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    kwargs: dict[str, Any] = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return (sample, 10, context), kwargs


@torch.no_grad()
def unet_output(unet: Any) -> torch.Tensor:
    args, kwargs = unet_inputs(unet)
    return unet(*args, **kwargs).sample


@torch.no_grad()
def text_output(encoder: Any) -> torch.Tensor:
    ids = torch.arange(2, 18).unsqueeze(0)
    return encoder(ids)[0]


def load_pipeline_with(location: str, family: str, data: bytes | None) -> Any:
    """The base pipeline with ``data`` loaded by diffusers' own ``load_lora_weights``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(location)
    if data is not None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "lora.safetensors").write_bytes(data)
            pipe.load_lora_weights(tmp, weight_name="lora.safetensors")
    return pipe


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_lora(tiny_sd1: str) -> MadeLora:
    return make_lora(tiny_sd1, "sd1", text_encoders=True)


@pytest.fixture(scope="module")
def sd2_lora(tiny_sd2: str) -> MadeLora:
    return make_lora(tiny_sd2, "sd2", text_encoders=False)


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl: str) -> MadeLora:
    return make_lora(tiny_sdxl, "sdxl", text_encoders=True)


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def any_lora(request: pytest.FixtureRequest) -> MadeLora:
    return request.getfixturevalue(f"{request.param}_lora")


# -- loading in diffusers -------------------------------------------------------------


def test_kohya_and_diffusers_files_load_in_diffusers_as_the_trained_lora(any_lora: MadeLora):
    """Both files, loaded by diffusers, reproduce the in-memory PEFT model's outputs."""
    trained_unet = unet_output(any_lora.unet)
    base = load_pipeline_with(any_lora.location, any_lora.family, None)
    assert not torch.allclose(unet_output(base.unet), trained_unet, atol=1e-3)  # LoRA matters

    for data in (any_lora.diffusers_bytes, any_lora.kohya_bytes()):
        pipe = load_pipeline_with(any_lora.location, any_lora.family, data)
        torch.testing.assert_close(unet_output(pipe.unet), trained_unet)
        for name, trained in any_lora.text_encoders.items():
            torch.testing.assert_close(text_output(getattr(pipe, name)), text_output(trained))


def test_kohya_file_applies_alpha_over_rank_to_a_layer(sd1_lora: MadeLora):
    """One targeted layer of the loaded kohya LoRA computes x (W + alpha/rank B A)^T."""
    kohya = load_tensors(sd1_lora.kohya_bytes())
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
    assert kohya[f"{name}.alpha"].item() == ALPHA

    pipe = load_pipeline_with(sd1_lora.location, "sd1", sd1_lora.kohya_bytes())
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    weight = layer.base_layer.weight
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(2))
    expected = x @ (weight + (ALPHA / RANK) * up @ down).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


# -- keys -----------------------------------------------------------------------------


def test_every_kohya_key_is_one_comfyui_maps(any_lora: MadeLora):
    from diffusers import UNet2DConditionModel

    kohya = load_tensors(any_lora.kohya_bytes())
    base_unet = UNet2DConditionModel.from_pretrained(any_lora.location, subfolder="unet")
    names = [name for name, _ in base_unet.named_modules()]
    assert comfyui_unmapped_keys(kohya, any_lora.family, names) == []
    assert len(kohya) == 3 * len(any_lora.tensors) // 2  # down, up, alpha per module


def test_comfyui_check_reports_keys_it_would_skip(sd1_lora: MadeLora):
    bad = [
        "lora_unet_down_blocks_0_not_a_module.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # SDXL name
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.weight",  # bad suffix
        "lora_te_text_model_final_layer_norm.lora_down.weight",
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
    ]
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
    names = [name for name, _ in sd1_lora.unet.named_modules()]
    assert comfyui_unmapped_keys([*bad, good], "sd1", names) == bad


def test_text_encoder_keys_use_kohya_prefixes(sd1_lora: MadeLora, sdxl_lora: MadeLora):
    sd1 = load_tensors(sd1_lora.kohya_bytes())
    te = [k for k in sd1 if not k.startswith("lora_unet_")]
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd1

    sdxl = load_tensors(sdxl_lora.kohya_bytes())
    prefixes = {k.split("text_model")[0] for k in sdxl if not k.startswith("lora_unet_")}
    assert prefixes == {"lora_te1_", "lora_te2_"}


def test_kohya_down_up_are_lora_a_and_b_and_alpha_is_a_float32_scalar(sd1_lora: MadeLora):
    source = sd1_lora.tensors
    kohya = diffusers_to_kohya(source, "sd1", ALPHA)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    name = "lora_unet_" + module.replace(".", "_")
    assert torch.equal(kohya[f"{name}.lora_down.weight"], source[f"unet.{module}.lora_A.weight"])
    assert torch.equal(kohya[f"{name}.lora_up.weight"], source[f"unet.{module}.lora_B.weight"])
    assert kohya[f"{name}.alpha"].shape == () and kohya[f"{name}.alpha"].dtype == torch.float32


def test_alpha_can_differ_per_component_and_comes_from_the_adapter_header(sd1_lora: MadeLora):
    alphas = alphas_from_adapter_metadata(read_metadata(sd1_lora.diffusers_bytes))
    assert alphas == {"unet": ALPHA, "text_encoder": ALPHA}
    kohya = diffusers_to_kohya(sd1_lora.tensors, "sd1", {"unet": 1.0, "text_encoder": 8.0})
    def alphas(prefix: str) -> set[float]:
        return {v.item() for k, v in kohya.items() if k.startswith(prefix) and k.endswith("alpha")}

    assert alphas("lora_unet_") == {1.0}
    assert alphas("lora_te_") == {8.0}


def test_converter_refuses_what_it_cannot_carry_over(sd1_lora: MadeLora):
    tensors = sd1_lora.tensors
    with pytest.raises(LoraFormatError, match="not a diffusers/PEFT LoRA key"):
        dora = {**tensors, "unet.conv_in.lora_magnitude_vector": torch.ones(4)}
        diffusers_to_kohya(dora, "sd1", 1)
    half = {k: v for k, v in tensors.items() if not k.endswith("attn1.to_q.lora_B.weight")}
    with pytest.raises(LoraFormatError, match="lacks lora_A or lora_B"):
        diffusers_to_kohya(half, "sd1", 1)
    with pytest.raises(LoraFormatError, match="no alpha given for text_encoder"):
        diffusers_to_kohya(tensors, "sd1", {"unet": 1.0})
    second = {k.replace("text_encoder.", "text_encoder_2.", 1): v for k, v in tensors.items()}
    with pytest.raises(LoraFormatError, match="sd1 LoRA has no 'text_encoder_2'"):
        diffusers_to_kohya(second, "sd1", 1.0)


def test_detect_format_tells_the_layouts_apart(sd1_lora: MadeLora):
    assert detect_format(sd1_lora.tensors) == "diffusers"
    assert detect_format(load_tensors(sd1_lora.kohya_bytes())) == "kohya"
    assert detect_format(["model.diffusion_model.input_blocks.1.1.proj_in.weight"]) == "unknown"
    assert detect_format([]) == "unknown"
