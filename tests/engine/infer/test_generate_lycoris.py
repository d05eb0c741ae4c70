"""``generate`` renders with published LoHa / LoKr / DoRA files as the trained adapter does
(merged weights equal PEFT's within fp32 rounding, images within one level), with the
tokens a kohya file bundles and ``--embedding`` files; files that do not fit are refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_tensors

from engine.errors import LoraflowError
from engine.infer.generate import (
    LoraFileRefused,
    open_pipeline,
    render_images,
    set_lora_scale,
)
from engine.infer.pipeline import load_pipeline
from engine.lora.embeddings import load_trained_tokens
from engine.lora.metadata import read_metadata, write_lora_file
from engine.lora.weights import load_into_pipeline, restore_lora
from engine.model.loading import add_lora_adapters, inspect_model, load_base_model
from engine.store import storage
from engine.train.new_token_state import published_token_file
from flows.cli.lora import add_commands
from tests.support.engine import checkpoint_bytes
from tests.support.lycoris_runs import NEW_TOKENS, SDXL, Published, published

PROMPT = "a red circle"
CASES = {"loha-sd1": ("loha", {}), "lokr-sd1": ("lokr", {}), "dora-sd1": ("dora", {}),
         "loha-sdxl": ("loha", SDXL)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Published]:
    root = tmp_path_factory.mktemp("lycoris")
    made = {case: published(root / case, kind, **changes)
            for case, (kind, changes) in CASES.items()}
    made["tokens-sd1"] = published(root / "tokens-sd1", "lora", **NEW_TOKENS)
    made["tokens-sdxl"] = published(root / "tokens-sdxl", "lora", **NEW_TOKENS, **SDXL)
    return made


def trained_pipe(run: Published):
    """The pipeline with the in-memory trained adapter (PEFT), merged into its weights."""
    pipe, _, _ = load_pipeline(run.task.model, torch.float32, safety_checker=False)
    load_into_pipeline(pipe, checkpoint_bytes(run.checkpoint)["lora"])
    return pipe


def published_pipe(run: Published, scale: float = 1.0):
    pipe, _ = open_pipeline(run.task.model.name, run.files["kohya"], lora_scale=scale,
                            device="cpu")
    return pipe


def trained_models(run: Published) -> dict[str, torch.nn.Module]:
    """The models as training left them: the task's adapters, the checkpoint restored."""
    base = load_base_model(run.task, torch.device("cpu"), with_vae=False, with_text=True)
    add_lora_adapters(base, run.task)
    models = {"unet": base.unet} | {
        "text_encoder" if i == 0 else f"text_encoder_{i + 1}": encoder
        for i, encoder in enumerate(base.text_encoders)}
    restore_lora(checkpoint_bytes(run.checkpoint)["lora"], models)
    return models


def adapted_weights(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{component.layer: weight} of every PEFT-adapted layer, the adapter merged in."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for component, model in models.items():
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                out[f"{component}.{name}"] = layer.get_base_layer().weight.detach().clone()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_published_file_merges_to_the_trained_adapters_weights(
    runs: dict[str, Published], case: str
) -> None:
    trained = adapted_weights(trained_models(runs[case]))
    pipe = published_pipe(runs[case])
    assert len(trained) == 40 if case.endswith("sd1") else len(trained) > 40
    for name, expected in trained.items():
        component, layer = name.split(".", 1)
        got = layer_of(getattr(pipe, component), layer).weight
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["loha-sd1", "lokr-sd1"])
def test_images_from_the_published_file_equal_the_trained_adapters(
    runs: dict[str, Published], case: str
) -> None:
    def image(pipe) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        [out] = render_images(pipe, "m", None, PROMPT, seed=1, steps=2, guidance=5.0)
        return np.asarray(out, dtype=np.int16)

    trained = trained_pipe(runs[case])
    assert np.abs(image(published_pipe(runs[case])) - image(trained)).max() <= 1


def test_strength_scales_the_merged_change_and_zero_is_the_base_model(
    runs: dict[str, Published],
) -> None:
    run = runs["loha-sd1"]
    base, _, _ = load_pipeline(run.task.model, torch.float32, safety_checker=False)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = base.unet.get_submodule(layer).weight
    pipe = published_pipe(run, scale=0.0)
    weight = pipe.unet.get_submodule(layer).weight
    assert torch.equal(weight, w0)
    set_lora_scale(pipe, 1.0)
    full = weight.detach().clone()
    set_lora_scale(pipe, 0.5)
    torch.testing.assert_close(weight, w0 + 0.5 * (full - w0))
    assert not torch.equal(full, w0)


@pytest.mark.parametrize("case", ["tokens-sd1", "tokens-sdxl"])
def test_bundled_tokens_are_the_trained_ones_and_work_in_the_prompt(
    runs: dict[str, Published], case: str
) -> None:
    run = runs[case]
    pipe = published_pipe(run)
    rows = load_tensors(rows_file(run))
    pairs = [("text_encoder", pipe.tokenizer, pipe.text_encoder)]
    if case.endswith("sdxl"):
        pairs.append(("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2))
    for prefix, tokenizer, encoder in pairs:
        ids = tokenizer.convert_tokens_to_ids(["<ohw>", "<ohw>_1"])
        matrix = encoder.get_input_embeddings().weight
        assert torch.equal(matrix[ids], rows[f"new_tokens.<ohw>.{prefix}"])
    assert pipe.unet.peft_config  # the LoRA beside the tokens
    # the same images as the trained tokens put on the pipeline the user's way
    expected, _, _ = load_pipeline(run.task.model, torch.float32, safety_checker=False)
    load_into_pipeline(expected, checkpoint_bytes(run.checkpoint)["lora"])
    load_trained_tokens(expected, run.task, inspect_model(run.task.model)[1],
                        {published_token_file(run.task): rows_file(run)})
    for p in (pipe, expected):
        p.set_progress_bar_config(disable=True)
    got, want = (np.asarray(render_images(p, "m", None, "a <sks> <ohw> circle", seed=2,
                                          steps=2, guidance=5.0)[0], dtype=np.int16)
                 for p in (pipe, expected))
    assert np.abs(got - want).max() <= 1


def test_embedding_option_loads_textual_inversion_files_by_their_token(
    runs: dict[str, Published], tmp_path: Path
) -> None:
    run = runs["tokens-sd1"]
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "generate", "--model", run.task.model.name, "--prompt", "a <sks> <ohw> circle",
        "--steps", "2", "--output-dir", str(tmp_path), "--device", "cpu",
        "--embedding", run.files["embedding:<sks>"], "--embedding", run.files["embedding:<ohw>"],
    ])
    assert args.func(args) == 0
    with Image.open(tmp_path / "seed0-00.png") as png:
        assert png.text["parameters"].startswith("a <sks> <ohw> circle")
    pipe, _ = open_pipeline(run.task.model.name, None, device="cpu",
                            embeddings=[run.files["embedding:<ohw>"]])
    assert pipe.maybe_convert_prompt("a <ohw>", pipe.tokenizer) == "a <ohw> <ohw>_1"


def test_a_lycoris_file_of_another_family_is_refused(runs: dict[str, Published]) -> None:
    with pytest.raises(LoraFileRefused, match="is a sdxl LoRA"):
        open_pipeline(runs["loha-sd1"].task.model.name, runs["loha-sdxl"].files["kohya"],
                      device="cpu")


def test_a_bundle_for_an_encoder_the_model_lacks_is_refused(
    runs: dict[str, Published], tmp_path: Path
) -> None:
    sd1, sdxl = runs["tokens-sd1"], runs["tokens-sdxl"]
    data = storage.read_bytes(sd1.files["kohya"])
    renamed = {k.replace("string_to_param.*", "clip_g"): v for k, v in load_tensors(data).items()}
    path = tmp_path / "clip_g_bundle.safetensors"
    path.write_bytes(write_lora_file(renamed, read_metadata(data)))
    with pytest.raises(LoraflowError, match="second text encoder"):
        open_pipeline(sd1.task.model.name, str(path), device="cpu")
    with pytest.raises(LoraflowError, match="needs clip_l and clip_g"):  # SD1 vectors on SDXL
        open_pipeline(sdxl.task.model.name, None, device="cpu",
                      embeddings=[sd1.files["embedding:<sks>"]])


def layer_of(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """A layer by name, with or without CLIP's ``text_model.`` level (transformers 4 / 5)."""
    names = dict(model.named_modules())
    bare = name.removeprefix("text_model.")
    return names.get(name) or names.get(bare) or names[f"text_model.{bare}"]


def rows_file(run: Published) -> bytes:
    return (Path(run.checkpoint) / published_token_file(run.task)).read_bytes()
