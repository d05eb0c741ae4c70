"""Nobody takes the wrong file: ``inspect``, the model card and the README name the file
each tool loads fully (diffusers file: diffusers only; kohya file: diffusers and ComfyUI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.infer.generate import format_report, inspect_lora
from engine.lora.card import CardFiles, render_model_card
from engine.lora.formats import lora_modules
from engine.lora.loaders import A1111, COMFYUI, DIFFUSERS, tool_support
from engine.lora.metadata import LoraFacts, write_lora_file
from engine.model.loading import inspect_model
from tests.engine.lora.test_formats import MadeLora, make_lora
from tests.engine.lora.test_publish import make_task

README = Path(__file__).resolve().parents[3] / "README.md"
KOHYA = "loraflow_shapes.safetensors"


@pytest.fixture(scope="module")
def sd1(tiny_sd1: str) -> MadeLora:
    return make_lora(tiny_sd1, "sd1", text_encoders=True)  # 32 UNet attention + 8 CLIP


@pytest.fixture(scope="module")
def files(sd1: MadeLora, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("which")
    paths = {"diffusers": folder / "pytorch_lora_weights.safetensors", "kohya": folder / KOHYA}
    paths["diffusers"].write_bytes(sd1.diffusers_bytes)
    paths["kohya"].write_bytes(sd1.kohya_bytes())
    return {k: str(v) for k, v in paths.items()}


# -- the verdict ------------------------------------------------------------------------


def test_diffusers_file_loads_fully_in_diffusers_only(sd1: MadeLora):
    verdict = tool_support("diffusers", "sd1", lora_modules(sd1.tensors, _header(sd1)))
    assert verdict.loads_fully_in == (DIFFUSERS,)
    assert verdict.elsewhere.startswith(f"{COMFYUI} / {A1111}: use the kohya file")
    assert "skips 32 of this file's 40 modules (UNet attention)" in verdict.elsewhere
    assert "scale 1, not alpha / rank" in verdict.elsewhere  # alpha 2, rank 4


def test_kohya_file_loads_fully_in_diffusers_and_comfyui(sd1: MadeLora):
    kohya = load_tensors(sd1.kohya_bytes())
    verdict = tool_support("kohya", "sd1", lora_modules(kohya, {}))
    assert verdict.loads_fully_in == (DIFFUSERS, COMFYUI)
    assert A1111 in verdict.elsewhere


def test_an_sdxl_kohya_file_named_add_embedding_is_comfyui_only():
    """Such a file (loraflow before the fix, other tools) loses a layer in diffusers."""
    kohya = _kohya_file(["lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2",
                         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"])
    verdict = tool_support("kohya", "sdxl", lora_modules(kohya, {}))
    assert verdict.loads_fully_in == (COMFYUI,)
    assert "use the diffusers file" in verdict.elsewhere
    assert "lora_unet_add_embedding_linear_1" in verdict.elsewhere


def test_kohya_names_outside_the_checked_map_are_not_claimed():
    kohya = _kohya_file(["lora_unet_input_blocks_4_1_proj_in", "lora_unet_label_emb_0_0"])
    verdict = tool_support("kohya", "sd1", lora_modules(kohya, {}))  # no label_emb in SD 1.x
    assert verdict.loads_fully_in == ()
    assert verdict.elsewhere.startswith("not known: 2 modules")
    assert tool_support("kohya", "sdxl", lora_modules(kohya, {})).loads_fully_in == ()


# -- inspect ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "tools"), [("diffusers", [DIFFUSERS]), ("kohya", [DIFFUSERS, COMFYUI])]
)
def test_inspect_says_which_tools_load_the_file_fully(
    fmt: str, tools: list[str], files: dict[str, str]
):
    report = inspect_lora(files[fmt])
    assert report["loads_fully_in"] == tools
    json.dumps(report)  # what ``inspect --json`` prints
    text = format_report(report)
    assert f"loads fully in: {', '.join(tools)}\n" in text
    assert f"other tools:    {report['other_tools']}" in text
    if fmt == "diffusers":
        assert "use the kohya file" in report["other_tools"]


# -- the model card and the README -----------------------------------------------------


def _card(files: CardFiles) -> str:
    task = make_task()
    facts = LoraFacts(task=task, family=inspect_model(task.model)[1], title="shapes",
                      steps=1, dataset_hash="d" * 64)
    return render_model_card(facts, files, [])


def test_card_names_the_file_for_each_tool(tiny_sd1: str):
    card = _card(CardFiles(kohya=KOHYA))
    assert "| diffusers (`load_lora_weights`), `loraflow generate` | " \
        "`pytorch_lora_weights.safetensors` |" in card
    assert f"| ComfyUI, AUTOMATIC1111 / Forge, InvokeAI | `{KOHYA}` |" in card
    assert "Do not give `pytorch_lora_weights.safetensors` to ComfyUI" in card
    assert "cannot be written so that ComfyUI loads it fully" in card
    assert card.index("## Which file to use") < card.index("## How to use")


def test_card_with_one_file_points_every_tool_at_what_exists(tiny_sd1: str):
    kohya_only = _card(CardFiles(diffusers=None, kohya=KOHYA))
    assert "pytorch_lora_weights" not in kohya_only
    assert kohya_only.count(f"| `{KOHYA}` |") == 2
    diffusers_only = _card(CardFiles())
    assert "none published: add `\"kohya\"` to `output.lora_formats`" in diffusers_only


def test_readme_names_the_file_for_each_tool():
    text = README.read_text()
    opening = text.split("\n\n")[2]
    assert "`pytorch_lora_weights.safetensors` for diffusers" in opening
    assert "`loraflow_<run>.safetensors` for ComfyUI" in opening
    assert "| ComfyUI, AUTOMATIC1111 / Forge, InvokeAI | `loraflow_<run>.safetensors`" in text


def _header(made: MadeLora) -> dict[str, str]:
    from engine.lora.metadata import read_metadata

    return read_metadata(made.diffusers_bytes)


def _kohya_file(modules: list[str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in modules:
        tensors[f"{name}.lora_down.weight"] = torch.zeros(4, 8)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(8, 4)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    return load_tensors(write_lora_file(tensors, {}))
