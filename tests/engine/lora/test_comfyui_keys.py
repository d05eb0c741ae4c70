"""LoHa, LoKr, DoRA and LoCon files load in ComfyUI key for key and give PEFT's weights.

For each adapter type, on tiny-sd1 and tiny-sdxl (UNet and text encoders, rank 4,
alpha != rank, random factors and magnitudes so every term counts):

* every key of the kohya / LyCORIS file is one ComfyUI's ``load_lora`` consumes for that
  model (module names from ComfyUI's key map, tensor names from its weight adapters), so
  none is reported as "lora key not loaded";
* merging the file into the base weights by ComfyUI's formulas (our own implementation of
  its math, below) gives the weights PEFT's own ``merge`` gives the trained adapter;
* where diffusers reads the type (LoRA incl. LoCon, DoRA) the PEFT file loaded with
  ``load_lora_weights`` gives the trained adapter's UNet output.

ComfyUI facts, read from comfyanonymous/ComfyUI: comfy/lora.py ``load_lora`` (reads
``<x>.alpha`` and ``<x>.dora_scale``, then each adapter's tensors), comfy/weight_adapter/
loha.py at 17adbb5cacc2, lokr.py at 179c2d35c84b, lora.py at 0323d8746da9 and base.py
(``weight_decompose``) at 9c0cf36cd796; module names as in test_kohya_families (41444b5).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.lora.lycoris import module_weights, peft_to_lycoris
from engine.lora.metadata import read_metadata
from engine.lora.weights import lora_file_bytes
from engine.model.loading import adapter_config
from tests.engine.lora.test_formats import load_pipeline_with, unet_output
from tests.engine.lora.test_kohya_families import (
    COMFYUI_TE_PREFIXES,
    COMFYUI_UNET,
    COMFYUI_UNET_SDXL,
)

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 3.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1", "conv2",
                "conv_shortcut", "downsamplers.0.conv"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]
CONV_PATTERNS = {"conv1": CONV_RANK, "conv2": CONV_RANK, "conv_shortcut": CONV_RANK,
                 r"downsamplers\.0\.conv": CONV_RANK}
KINDS = ["lora", "dora", "loha", "lokr"]

#: Tensor names each ComfyUI weight adapter consumes after ``<module>.`` (plus .alpha and
#: .dora_scale, which load_lora reads for every module).
COMFYUI_TENSORS = {
    "lora": r"lora_up\.weight|lora_down\.weight|lora_mid\.weight",
    "loha": r"hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|hada_t1|hada_t2",
    "lokr": r"lokr_w1|lokr_w2|lokr_w1_a|lokr_w1_b|lokr_w2_a|lokr_w2_b|lokr_t2",
}


def comfyui_accepts(family: str) -> re.Pattern[str]:
    unet = COMFYUI_UNET + (COMFYUI_UNET_SDXL if family == "sdxl" else [])
    names = [f"lora_unet_({'|'.join(unet)})"]
    for prefix, modules in COMFYUI_TE_PREFIXES[family].items():
        names.append(f"{prefix}({'|'.join(modules)})")
    tensors = "|".join(COMFYUI_TENSORS.values())
    return re.compile(rf"^({'|'.join(names)})\.({tensors}|alpha|dora_scale)$")


# -- ComfyUI's formulas (our implementation of its math) ---------------------------------


def comfyui_merged(weight: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight ComfyUI builds from one module's tensors at strength 1 (fp32)."""
    weight = weight.float().clone()
    alpha = parts.get("alpha")
    if "hada_w1_a" in parts:
        scale = float(alpha) / parts["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        return weight + scale * diff.reshape(weight.shape)
    if any(k.startswith("lokr_") for k in parts):
        dim = None
        w1 = parts.get("lokr_w1")
        if w1 is None:
            dim = parts["lokr_w1_b"].shape[0]
            w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        w2 = parts.get("lokr_w2")
        if w2 is None:
            dim = parts["lokr_w2_b"].shape[0]
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        return weight + scale * torch.kron(w1, w2).reshape(weight.shape)
    up, down = parts["lora_up.weight"], parts["lora_down.weight"]
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    if "dora_scale" not in parts:
        return weight + scale * diff
    dora = parts["dora_scale"]
    merged = weight + scale * diff
    assert dora.shape[0] == weight.shape[0], "ComfyUI's output-axis branch"
    norm = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return merged * (dora / (norm + torch.finfo(weight.dtype).eps))


# -- the adapters ---------------------------------------------------------------------------


def _randomise(module: Any, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if "magnitude" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif any(m in name for m in ("lora_", "hada_", "lokr_")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def make_adapter(location: str, family: str, kind: str) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    base = pipeline.from_pretrained(location)
    adapted = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(5)
    config = adapter_config(kind, RANK, ALPHA, UNET_TARGETS, True, -1, CONV_PATTERNS,
                            dict.fromkeys(CONV_PATTERNS, CONV_ALPHA))
    adapted.unet.add_adapter(config)
    _randomise(adapted.unet, generator)
    encoders = {}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(adapted, name, None)
        if encoder is not None:
            encoder.add_adapter(adapter_config(kind, RANK, ALPHA, TEXT_TARGETS, True, -1, {}, {}))
            _randomise(encoder, generator)
            encoders[name] = encoder
    data = lora_file_bytes(pipeline, adapted.unet, encoders)
    components = {"unet": base.unet, **{n: getattr(base, n) for n in encoders}}
    lycoris = peft_to_lycoris(load_tensors(data), family, read_metadata(data),
                              module_weights(components))
    return {"base": base, "adapted": adapted, "peft_file": data, "lycoris": lycoris,
            "components": components, "encoders": encoders}


@pytest.fixture(scope="module", params=[(f, k) for f in ("sd1", "sdxl") for k in KINDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def made(request: pytest.FixtureRequest) -> dict[str, Any]:
    family, kind = request.param
    location = request.getfixturevalue(f"tiny_{family}")
    return {"family": family, "kind": kind, "location": location,
            **make_adapter(location, family, kind)}


def _group(lycoris: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lycoris.items():
        module, _, part = key.partition(".")
        modules.setdefault(module, {})[part] = tensor
    return modules


def _peft_merged(adapted: Any, made: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{kohya module name: weight} after PEFT's own merge of each adapted layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from engine.lora.formats import KOHYA_PREFIXES, kohya_module_path

    out = {}
    prefixes = KOHYA_PREFIXES[made["family"]]
    for component in ("unet", *made["encoders"]):
        model = copy.deepcopy(getattr(adapted, component))
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                path = kohya_module_path(component, name)
                out[prefixes[component] + path] = layer.get_base_layer().weight.detach().float()
    return out


def test_every_key_is_one_comfyui_loads(made: dict[str, Any]) -> None:
    accepts = comfyui_accepts(made["family"])
    unloaded = [k for k in made["lycoris"] if not accepts.match(k)]
    assert unloaded == []
    suffixes = {k.partition(".")[2] for k in made["lycoris"]}
    expected = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
                "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
                "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}
    if made["kind"] in expected:
        assert suffixes == expected[made["kind"]]
    else:
        assert suffixes <= {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}


def test_comfyui_formulas_on_the_file_give_peft_merged_weights(made: dict[str, Any]) -> None:
    from engine.lora.formats import KOHYA_PREFIXES

    merged = _peft_merged(made["adapted"], made)
    modules = _group(made["lycoris"])
    assert set(modules) == set(merged)
    weight_of = module_weights(made["components"])
    prefixes = {p: c for c, p in KOHYA_PREFIXES[made["family"]].items()}
    names = _module_names(made)
    for module, parts in modules.items():
        prefix = next(p for p in sorted(prefixes, key=len, reverse=True) if module.startswith(p))
        base = weight_of(prefixes[prefix], names[module])
        got = comfyui_merged(base, parts)
        torch.testing.assert_close(got, merged[module], rtol=1e-4, atol=1e-5, msg=module)


def _module_names(made: dict[str, Any]) -> dict[str, str]:
    from engine.lora.formats import KOHYA_PREFIXES, kohya_module_path

    names = {}
    for component, model in made["components"].items():
        prefix = KOHYA_PREFIXES[made["family"]][component]
        for name, _ in model.named_modules():
            if name:
                names[prefix + kohya_module_path(component, name)] = name
    return names


def test_convolutions_have_their_own_rank_and_alpha(made: dict[str, Any]) -> None:
    alphas = {k: float(v) for k, v in made["lycoris"].items() if k.endswith(".alpha")}
    conv = [v for k, v in alphas.items() if "resnets" in k and "conv1" in k]
    attn = [v for k, v in alphas.items() if k.endswith("attn1_to_q.alpha")]
    if made["kind"] == "lokr":  # whole factors: scale folded in, alpha written as the rank
        return
    assert set(conv) == {CONV_ALPHA} and set(attn) == {ALPHA}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_diffusers_loads_the_peft_file_with_the_trained_output(
    tiny_sd1: str, tiny_sdxl: str, kind: str
) -> None:
    for family, location in (("sd1", tiny_sd1), ("sdxl", tiny_sdxl)):
        adapter = make_adapter(location, family, kind)
        pipe = load_pipeline_with(location, family, adapter["peft_file"])
        expected = unet_output(adapter["adapted"].unet)
        torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(unet_output(adapter["base"].unet), expected, atol=1e-3)


def test_engine_comfyui_check_agrees_on_lycoris_files(made: dict[str, Any]) -> None:
    from engine.lora.formats import comfyui_unmapped_keys

    names = [n for n, _ in made["base"].unet.named_modules()]
    assert comfyui_unmapped_keys(made["lycoris"], made["family"], names) == []
