"""``generate`` renders with a LoRA deterministically at the asked strength, writes the
parameters into the PNG, and ``inspect`` says what a LoRA file holds; pickles are refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.infer.generate import LoraFileRefused, generate_images, inspect_lora
from engine.lora.formats import diffusers_to_kohya
from engine.lora.metadata import write_lora_file
from flows.cli.lora import add_commands
from tests.engine.lora.test_formats import ALPHA, RANK, make_lora

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def lora_files(tiny_sd1: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The sd1 LoRA (UNet and text encoder) as a diffusers file and a kohya file."""
    made = make_lora(tiny_sd1, "sd1", text_encoders=True)
    folder = tmp_path_factory.mktemp("loras")
    meta = {
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.prediction_type": "epsilon",
        "loraflow_task": json.dumps({"seed": 1}),
    }
    paths = {"diffusers": folder / "pytorch_lora_weights.safetensors",
             "kohya": folder / "my_shapes.safetensors"}
    paths["diffusers"].write_bytes(made.diffusers_bytes)
    kohya = diffusers_to_kohya(made.tensors, "sd1", ALPHA)
    paths["kohya"].write_bytes(write_lora_file(kohya, meta))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def sdxl_lora_file(tiny_sdxl: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sdxl") / "sdxl_lora.safetensors"
    path.write_bytes(make_lora(tiny_sdxl, "sdxl", text_encoders=True).diffusers_bytes)
    return str(path)


def render(model: str, lora: str | None, **options) -> list[np.ndarray]:
    images = generate_images(model, lora, PROMPT, steps=2, **options)
    return [np.asarray(image, dtype=np.int16) for image in images]


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# -- generate --------------------------------------------------------------------------


def test_a_seed_gives_the_same_images_and_image_i_uses_seed_plus_i(
    tiny_sd1: str, lora_files: dict[str, str]
):
    first = render(tiny_sd1, lora_files["diffusers"], seed=3, num_images=2)
    again = render(tiny_sd1, lora_files["diffusers"], seed=3)
    next_seed = render(tiny_sd1, lora_files["diffusers"], seed=4)
    assert np.array_equal(first[0], again[0])
    assert np.array_equal(first[1], next_seed[0])
    assert not np.array_equal(first[0], first[1])
    assert first[0].shape == (64, 64, 3)


def test_lora_scale_zero_renders_the_base_model_and_one_renders_the_lora(
    tiny_sd1: str, lora_files: dict[str, str]
):
    base = render(tiny_sd1, None, seed=1)[0]
    off = render(tiny_sd1, lora_files["diffusers"], seed=1, lora_scale=0.0)[0]
    full = render(tiny_sd1, lora_files["diffusers"], seed=1, lora_scale=1.0)[0]
    kohya = render(tiny_sd1, lora_files["kohya"], seed=1, lora_scale=1.0)[0]
    assert np.array_equal(off, base)
    assert np.abs(full - base).max() > 10
    assert np.abs(kohya - full).max() <= 1  # both formats: the same LoRA at the same alpha


def test_generate_command_writes_pngs_with_a1111_parameters(
    tiny_sd1: str, lora_files: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
):
    code = run_cli(
        "generate", "--model", tiny_sd1, "--lora", lora_files["kohya"], "--prompt", PROMPT,
        "--seed", "3", "--steps", "2", "--guidance", "5", "--lora-scale", "0.8",
        "--negative-prompt", "blurry", "--output-dir", str(tmp_path),
    )
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "seed3-00.png")]
    with Image.open(printed[0]) as png:
        parameters = png.text["parameters"]
    prompt_line, negative_line, fields = parameters.split("\n")
    assert prompt_line == f"{PROMPT} <lora:my_shapes:0.8>"
    assert negative_line == "Negative prompt: blurry"
    for field in ("Steps: 2", "CFG scale: 5", "Seed: 3", "Size: 64x64", "Lora hashes: "):
        assert field in fields


def test_lora_for_another_family_is_refused(tiny_sd1: str, sdxl_lora_file: str):
    with pytest.raises(LoraFileRefused, match="is a sdxl LoRA"):
        generate_images(tiny_sd1, sdxl_lora_file, PROMPT, steps=1)


# -- inspect ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_inspect_reports_format_rank_alpha_and_targets(fmt: str, lora_files: dict[str, str]):
    report = inspect_lora(lora_files[fmt])
    assert report["format"] == fmt
    assert report["ranks"] == [RANK] and report["alphas"] == [ALPHA]
    assert report["scales"] == [ALPHA / RANK] and report["alpha_stored"]
    assert report["target_kinds"] == ["k_proj", "out_proj", "q_proj", "to_k", "to_out.0",
                                      "to_q", "to_v", "v_proj"]
    assert report["components"] == {"text_encoder": 8, "unet": 32}
    assert report["modules"] == 40


def test_inspect_guesses_the_family_and_abbreviates_metadata(
    sdxl_lora_file: str, lora_files: dict[str, str]
):
    assert inspect_lora(sdxl_lora_file)["family"] == "sdxl"  # by its second text encoder
    assert inspect_lora(lora_files["kohya"])["family"] == "sd1"  # by modelspec.architecture
    assert inspect_lora(lora_files["diffusers"])["family"] == "unknown"  # tiny widths, no header
    meta = inspect_lora(lora_files["diffusers"])["metadata"]
    assert meta["lora_adapter_metadata"] == (
        "text_encoder.lora_alpha=2.0, text_encoder.r=4, unet.lora_alpha=2.0, unet.r=4"
    )


def test_inspect_command_prints_text_or_json(
    lora_files: dict[str, str], capsys: pytest.CaptureFixture
):
    assert run_cli("inspect", lora_files["kohya"]) == 0
    text = capsys.readouterr().out
    assert "format:     kohya" in text and "alpha:      2" in text and "scale:      0.5" in text
    assert run_cli("inspect", "--json", lora_files["kohya"]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == [RANK]


# -- refusing pickles ------------------------------------------------------------------


def test_pickle_lora_files_are_refused_unopened(tmp_path: Path, tiny_sd1: str):
    pickle_file = tmp_path / "lora.bin"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickle_file)
    with pytest.raises(LoraFileRefused, match="never unpickled"):
        inspect_lora(str(pickle_file))
    with pytest.raises(LoraFileRefused, match="never unpickled"):
        generate_images(tiny_sd1, str(pickle_file), PROMPT, steps=1)
    disguised = tmp_path / "lora.safetensors"
    disguised.write_bytes(pickle_file.read_bytes())
    with pytest.raises(LoraFileRefused, match="pickle"):
        inspect_lora(str(disguised))


def test_a_safetensors_file_that_starts_like_a_pickle_is_still_read(
    lora_files: dict[str, str], tmp_path: Path
):
    """A header length whose low byte is 0x80 looks like pickle's first byte."""
    tensors = load_file(lora_files["kohya"])
    for length in range(300):
        data = write_lora_file(tensors, {"pad": "x" * length})
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    path = tmp_path / "looks_like_pickle.safetensors"
    path.write_bytes(data)
    assert inspect_lora(str(path))["ranks"] == [RANK]
