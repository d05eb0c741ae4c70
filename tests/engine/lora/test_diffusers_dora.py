"""A diffusers-format DoRA file on a pipeline gives the trained adapter, text encoders
included (engine.lora.diffusers_dora, engine.lora.weights.load_into_pipeline).

diffusers 0.42.1 with transformers 5.23 loads a text encoder's DoRA without its
magnitudes. The UNet-only comparison in test_comfyui_keys cannot see that, so these tests
compare the text encoders' outputs too. Adapters are random (factors and magnitudes, see
``make_adapter``) so every term counts, or trained on tiny-sd1 as a run trains them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.lora.diffusers_dora import DoraLoadError, load_text_encoder_magnitudes
from engine.lora.weights import LORA_FILE, load_into_pipeline, restore_lora
from engine.model.loading import add_lora_adapters, load_base_model
from tests.engine.lora.test_comfyui_keys import make_adapter
from tests.engine.lora.test_formats import load_pipeline_with, text_output, unet_output
from tests.support.engine import make_task, run_chain


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def dora(request: pytest.FixtureRequest) -> dict[str, Any]:
    family = request.param
    location = request.getfixturevalue(f"tiny_{family}")
    return {"family": family, "location": location, **make_adapter(location, family, "dora")}


def test_load_lora_weights_alone_leaves_text_encoder_magnitudes_untrained(
    dora: dict[str, Any],
) -> None:
    """The upstream fact inspect and the README state; if this fails, diffusers (or
    transformers) loads them now and those notes should say so."""
    pipe = load_pipeline_with(dora["location"], dora["family"], dora["peft_file"])
    for name, encoder in dora["encoders"].items():
        assert not torch.allclose(text_output(getattr(pipe, name)), text_output(encoder),
                                  atol=1e-3)
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(dora["adapted"].unet))


def test_pipeline_gets_every_text_encoder_and_the_unet_as_trained(dora: dict[str, Any]) -> None:
    pipe = load_pipeline_with(dora["location"], dora["family"], None)
    load_into_pipeline(pipe, dora["peft_file"])
    assert set(dora["encoders"]) == ({"text_encoder", "text_encoder_2"}
                                     if dora["family"] == "sdxl" else {"text_encoder"})
    for name, encoder in dora["encoders"].items():
        expected = text_output(encoder)
        assert not torch.allclose(text_output(getattr(dora["base"], name)), expected, atol=1e-3)
        torch.testing.assert_close(text_output(getattr(pipe, name)), expected,
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(dora["adapted"].unet),
                               rtol=1e-5, atol=1e-5)  # two load paths: 1.4e-6 on an AMD EPYC


def test_magnitude_of_another_shape_is_refused_naming_the_layer(dora: dict[str, Any]) -> None:
    pipe = load_pipeline_with(dora["location"], dora["family"], dora["peft_file"])
    tensors = dict(load_tensors(dora["peft_file"]))
    key = next(k for k in sorted(tensors) if k.startswith("text_encoder.")
               and k.endswith(".lora_magnitude_vector"))
    tensors[key] = torch.ones(tensors[key].shape[0] + 1)
    layer = key.removeprefix("text_encoder.").removesuffix(".lora_magnitude_vector")
    with pytest.raises(DoraLoadError) as refused:
        load_text_encoder_magnitudes(pipe, tensors, "default_0", "lora.safetensors")
    assert str(refused.value).startswith(
        f"lora.safetensors: text_encoder.{layer}.lora_magnitude_vector has shape")


def test_final_validation_loads_the_trained_dora_text_encoder(tmp_path: Path) -> None:
    """A tiny-sd1 DoRA run training the text encoder: the checkpoint's file, loaded as the
    final validation loads it, gives the outputs of the modules the trainer restores."""
    task = make_task(**{"lora.type": "dora", "lora.init_lora_weights": True,
                        "lora.text_encoder": {}, "train_args.learning_rate": 1e-2,
                        "train_args.max_train_steps": 2, "train_args.num_train_steps": 2})
    checkpoint = run_chain(task, tmp_path)[-1].checkpoint
    data = (Path(checkpoint) / LORA_FILE).read_bytes()
    base = load_base_model(task, torch.device("cpu"), with_vae=False, with_text=True)
    trained = add_lora_adapters(base, task)
    restore_lora(data, trained)
    pipe = load_pipeline_with(str(base.location), "sd1", None)
    base_output = text_output(pipe.text_encoder)
    load_into_pipeline(pipe, data)
    expected = text_output(trained["text_encoder"])
    assert not torch.allclose(base_output, expected, atol=1e-3)
    assert torch.equal(text_output(pipe.text_encoder), expected)
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(trained["unet"]),
                               rtol=1e-5, atol=1e-5)  # two load paths: 1.4e-6 on an AMD EPYC
