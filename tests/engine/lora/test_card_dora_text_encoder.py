"""The card's diffusers snippet loads a DoRA that trains the text encoder fully.

diffusers 0.42.1 with transformers 5 loads such a file's text encoders without their DoRA
magnitudes (engine.lora.diffusers_dora); the card then adds loraflow's
``load_text_encoder_magnitudes``. The snippet is executed for real here, on tiny-sd1 and a
random DoRA adapter (``make_adapter``), against the encoder the file was saved from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.lora.card import CardFiles, render_model_card
from engine.lora.metadata import LoraFacts
from engine.lora.weights import LORA_FILE
from engine.model.family import Family
from tests.engine.lora.test_comfyui_keys import make_adapter
from tests.engine.lora.test_formats import text_output, unet_output
from tests.support.engine import make_task

SD1 = Family(name="sd1", pipeline_class="StableDiffusionPipeline",
             text_encoders=(("tokenizer", "text_encoder"),), default_prediction_type="epsilon")
MAGNITUDE_CALL = "load_text_encoder_magnitudes(pipe"
FOLDER = "path/to/this/folder"
DORA_TE = {"lora.type": "dora", "lora.text_encoder": {}}


def _card(diffusers: str | None = LORA_FILE, kohya: str | None = None, **changes: Any) -> str:
    facts = LoraFacts(task=make_task(**changes), family=SD1, title="t", steps=1,
                      dataset_hash="h")
    return render_model_card(facts, CardFiles(diffusers=diffusers, kohya=kohya), ["a caption"])


def _python_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def _run(block: str, base: str, folder: Path) -> Any:
    """Execute the snippet on the real base-model folder and the folder holding the file."""
    code, replaced = re.subn(r'from_pretrained\("[^"]*"\)', f"from_pretrained({base!r})", block)
    assert replaced == 1
    assert FOLDER in code
    namespace: dict[str, Any] = {}
    exec(compile(code.replace(FOLDER, str(folder)), "<model card>", "exec"), namespace)
    return namespace["pipe"]


@pytest.fixture(scope="module")
def dora_sd1(tiny_sd1: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    made = make_adapter(tiny_sd1, "sd1", "dora")
    folder = tmp_path_factory.mktemp("published")
    (folder / LORA_FILE).write_bytes(made["peft_file"])
    return {"location": tiny_sd1, "folder": folder, **made}


@pytest.mark.parametrize("changes", [
    {},  # a plain LoRA on the UNet
    {"lora.text_encoder": {}},  # a plain LoRA on the text encoder too
    {"lora.type": "dora"},  # a DoRA on the UNet only: diffusers loads it fully
], ids=["lora", "lora-text-encoder", "dora-unet-only"])
def test_the_snippet_is_unchanged_where_diffusers_loads_the_file_fully(
    changes: dict[str, Any],
) -> None:
    block = _python_block(_card(**changes))
    assert MAGNITUDE_CALL not in block
    assert "adapter_name" not in block
    assert f'pipe.load_lora_weights("{FOLDER}", weight_name="{LORA_FILE}")\n' in block


def test_a_kohya_only_dora_gets_no_magnitude_call() -> None:
    block = _python_block(_card(diffusers=None, kohya="x.safetensors", **DORA_TE))
    assert MAGNITUDE_CALL not in block


def test_a_dora_text_encoder_snippet_puts_the_magnitudes_back() -> None:
    card = _card(**DORA_TE)
    block = _python_block(card)
    assert (f'pipe.load_lora_weights("{FOLDER}", weight_name="{LORA_FILE}", '
            'adapter_name="default_0")') in block
    assert (f'load_text_encoder_magnitudes(pipe, load_file("{FOLDER}/{LORA_FILE}"), '
            f'"default_0", "{LORA_FILE}")') in block
    assert "# diffusers leaves the text encoders' DoRA magnitudes untrained" in block
    assert "`load_text_encoder_magnitudes`" in card.split("## Files", 1)[1]


def test_the_card_snippet_run_for_real_gives_the_trained_text_encoder(
    dora_sd1: dict[str, Any],
) -> None:
    block = _python_block(_card(**DORA_TE))
    expected = text_output(dora_sd1["encoders"]["text_encoder"])
    assert not torch.allclose(text_output(dora_sd1["base"].text_encoder), expected, atol=1e-3)

    pipe = _run(block, dora_sd1["location"], dora_sd1["folder"])
    torch.testing.assert_close(text_output(pipe.text_encoder), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(dora_sd1["adapted"].unet),
                               rtol=1e-5, atol=1e-5)  # two load paths, as in test_diffusers_dora

    # the same snippet without the lines the card adds after load_lora_weights: untrained
    lines = block.splitlines()
    load = next(i for i, line in enumerate(lines) if line.startswith("pipe.load_lora_weights("))
    assert MAGNITUDE_CALL in "\n".join(lines[load + 1:])
    without = _run("\n".join(lines[:load + 1]) + "\n", dora_sd1["location"], dora_sd1["folder"])
    assert not torch.allclose(text_output(without.text_encoder), expected, atol=1e-3)
