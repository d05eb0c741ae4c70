"""``generate`` with a diffusers / PEFT DoRA file that adapts the text encoders: the
pipeline's text encoders and UNet give the adapter's outputs (diffusers alone leaves the
text encoders' magnitudes untrained: engine.lora.diffusers_dora)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.infer.generate import open_pipeline
from tests.engine.lora.test_comfyui_keys import make_adapter
from tests.engine.lora.test_formats import text_output, unet_output


def test_generate_loads_a_diffusers_dora_file_with_its_text_encoder_magnitudes(
    tiny_sdxl: str, tmp_path: Path
) -> None:
    adapter = make_adapter(tiny_sdxl, "sdxl", "dora")
    path = tmp_path / "dora.safetensors"
    path.write_bytes(adapter["peft_file"])
    pipe, _ = open_pipeline("loraflow/tiny-sdxl", str(path), device="cpu")
    for name, encoder in adapter["encoders"].items():
        torch.testing.assert_close(text_output(getattr(pipe, name)), text_output(encoder),
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(adapter["adapted"].unet),
                               rtol=1e-5, atol=1e-5)  # two load paths: 1.4e-6 on an AMD EPYC
