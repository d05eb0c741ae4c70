"""The card's diffusers snippet names the real base model, and never a local path."""

from __future__ import annotations

import pytest

from engine.lora.card import CardFiles, render_model_card
from engine.lora.metadata import LoraFacts
from engine.model.family import Family
from tests.support.engine import make_task

SD1 = Family(name="sd1", pipeline_class="StableDiffusionPipeline",
             text_encoders=(("tokenizer", "text_encoder"),), default_prediction_type="epsilon")


def _card(model_name: str) -> str:
    facts = LoraFacts(task=make_task(**{"model.name": model_name}), family=SD1,
                      title="t", steps=1, dataset_hash="h")
    files = CardFiles(diffusers="pytorch_lora_weights.safetensors", kohya=None,
                      validation_images=[], metrics=None)
    return render_model_card(facts, files, ["a caption"])


@pytest.mark.parametrize(
    "model_name, loaded",
    [
        ("runwayml/stable-diffusion-v1-5", 'from_pretrained("runwayml/stable-diffusion-v1-5")'),
        ("loraflow/tiny-sd1", 'from_pretrained("./tiny-sd1")'),
        ("/home/alice/models/my-sd15", 'from_pretrained("./my-sd15")'),
    ],
)
def test_the_diffusers_snippet_names_the_base_model(model_name: str, loaded: str) -> None:
    card = _card(model_name)
    assert loaded in card
    assert "<base model>" not in card


def test_an_embedded_base_says_how_to_build_it() -> None:
    assert "loraflow tiny-model tiny-sd1 ./tiny-sd1" in _card("loraflow/tiny-sd1")


def test_a_local_base_folder_is_named_without_its_path() -> None:
    assert "/home/alice" not in _card("/home/alice/models/my-sd15")


def test_published_task_and_metadata_name_a_local_base_by_its_folder_only(tmp_path) -> None:
    from engine.lora.metadata import kohya_metadata, public_task_dict

    local = str(tmp_path / "models" / "my-sd15")
    task = make_task(**{"model.name": local, "dataset.name": str(tmp_path / "photos")})
    facts = LoraFacts(task=task, family=SD1, title="t", steps=1, dataset_hash="h")
    published = public_task_dict(task)
    assert published["model"]["name"] == "my-sd15"
    assert published["dataset"]["name"] == "photos"
    assert kohya_metadata(facts)["ss_sd_model_name"] == "my-sd15"
    assert str(tmp_path) not in repr(published)
