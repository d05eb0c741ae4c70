"""Component overrides (model.text_encoder, .vae, .unet, tokenizers, dtypes): checked
before any weight is read, refused with the field and both families named, used when
they fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine.errors import LoraflowError
from engine.model.embedded.registry import resolve_model
from engine.model.loading import load_base_model
from tests.support.engine import make_task

CPU = torch.device("cpu")


def component_copy(model: str, subfolder: str, target: Path) -> str:
    """One component folder of a tiny model, on its own (as a user would give it)."""
    shutil.copytree(Path(resolve_model(model)) / subfolder, target)
    return str(target)


def test_sdxl_text_encoder_given_to_an_sd1_model_is_refused_naming_both(tmp_path: Path) -> None:
    encoder = component_copy("loraflow/tiny-sdxl", "text_encoder_2", tmp_path / "te")
    task = make_task(**{"model.text_encoder": encoder})
    with pytest.raises(LoraflowError) as caught:
        load_base_model(task, CPU)
    message = str(caught.value)
    assert "model.text_encoder" in message
    assert "SDXL" in message and "SD 1.x" in message


def test_second_text_encoder_on_a_one_encoder_model_is_refused(tmp_path: Path) -> None:
    encoder = component_copy("loraflow/tiny-sdxl", "text_encoder_2", tmp_path / "te")
    task = make_task(**{"model.text_encoder_2": encoder})
    with pytest.raises(LoraflowError, match=r"model\.text_encoder_2 is for SDXL.*SD 1\.x"):
        load_base_model(task, CPU)


def test_sdxl_vae_given_to_an_sd1_model_is_refused(tmp_path: Path) -> None:
    vae = component_copy("loraflow/tiny-sdxl", "vae", tmp_path / "vae")
    task = make_task(**{"model.vae": vae})
    with pytest.raises(LoraflowError, match=r"model\.vae.*scaling_factor.*SDXL VAE"):
        load_base_model(task, CPU)


def test_missing_override_path_is_a_clear_error(tmp_path: Path) -> None:
    task = make_task(**{"model.text_encoder": str(tmp_path / "nowhere")})
    with pytest.raises(LoraflowError, match=r"model\.text_encoder: no such folder"):
        load_base_model(task, CPU)


def test_folder_that_is_no_component_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    task = make_task(**{"model.tokenizer": str(tmp_path / "empty")})
    with pytest.raises(LoraflowError, match=r"model\.tokenizer: .* without tokenizer_config"):
        load_base_model(task, CPU)


def test_fitting_text_encoder_override_is_loaded_in_its_own_dtype(tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    own = CLIPTextModel.from_pretrained(resolve_model("loraflow/tiny-sd1"),
                                        subfolder="text_encoder")
    with torch.no_grad():
        for p in own.parameters():
            p.mul_(0.5)
    own.save_pretrained(tmp_path / "te")
    task = make_task(**{"model.text_encoder": str(tmp_path / "te"),
                        "model.text_encoder_dtype": "bf16"})

    base = load_base_model(task, CPU)

    encoder = base.text_encoders[0]
    assert encoder.dtype == torch.bfloat16 and base.unet.dtype == torch.float32
    expected = {k: v.to(torch.bfloat16) for k, v in own.state_dict().items()}
    assert all(torch.equal(expected[k], v) for k, v in encoder.state_dict().items())


def test_whole_model_folder_gives_its_same_named_component(tmp_path: Path) -> None:
    """A model folder as an override means its subfolder of that name (tiny-sd1 and the
    tiny SD 2 text encoder share a width but not an activation: this one fits)."""
    task = make_task(**{"model.unet": resolve_model("loraflow/tiny-sd1"),
                        "model.tokenizer": resolve_model("loraflow/tiny-sd1")})
    base = load_base_model(task, CPU, with_vae=False)
    assert base.unet.config.cross_attention_dim == 32


def test_sdxl_unet_given_to_an_sd1_model_is_refused() -> None:
    task = make_task(**{"model.unet": resolve_model("loraflow/tiny-sdxl")})
    with pytest.raises(LoraflowError, match=r"model\.unet.*SDXL UNet"):
        load_base_model(task, CPU)


def test_fp16_component_dtype_on_a_cpu_is_refused() -> None:
    task = make_task(**{"model.vae_dtype": "fp16"})
    with pytest.raises(LoraflowError, match=r"model\.vae_dtype 'fp16' needs a GPU"):
        load_base_model(task, CPU)


def test_task_without_overrides_keeps_its_model_identity() -> None:
    assert make_task().model.stable_dump() == {
        "name": "loraflow/tiny-sd1", "variant": None, "revision": "main", "vae": None}


def test_an_override_gets_its_own_cache_fingerprint() -> None:
    from engine.train.cache import cache_fingerprint

    plain = make_task()
    other = make_task(**{"model.text_encoder": "someone/other-encoder"})
    assert cache_fingerprint(plain, "m", "d") != cache_fingerprint(other, "m", "d")
