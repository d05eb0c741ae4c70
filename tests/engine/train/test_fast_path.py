"""The step's fast-path pieces that run on any device: loss summed on the device, AdamW's
kernel choice, the device transfer, compiled UNet blocks."""

from __future__ import annotations

import torch

from engine.model.embedded.tiny_models import build_tiny_pipeline
from engine.train.compiled import compile_unet_blocks, is_compiled, uncompile, unet_blocks
from engine.train.optimizers import adamw_kernel
from engine.train.transfer import to_device


def test_fp64_device_sum_equals_the_sum_of_python_floats() -> None:
    gen = torch.Generator().manual_seed(0)
    losses = [torch.rand((), generator=gen, dtype=torch.float32) / 7 for _ in range(13)]
    python_total = 0.0
    device_total = torch.zeros((), dtype=torch.float64)
    for loss in losses:
        python_total += loss.item()
        device_total += loss.detach().double()
    assert device_total.item() == python_total


def test_adamw_on_a_cpu_keeps_the_per_weight_loop() -> None:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    assert adamw_kernel(groups) == {"foreach": False}


def test_to_device_on_a_cpu_is_the_same_tensor_values() -> None:
    t = torch.arange(6.0)
    assert torch.equal(to_device(t, torch.device("cpu")), t)


def test_compiled_blocks_give_the_eager_result_and_uncompile() -> None:
    unet = build_tiny_pipeline("tiny-sd1").unet.eval()
    latents = torch.randn(1, unet.config.in_channels, 8, 8,
                          generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim,
                         generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = unet(latents, torch.tensor([10]), encoder_hidden_states=embeds).sample
        assert compile_unet_blocks(unet, backend="eager") == len(unet_blocks(unet))
        assert is_compiled(unet)
        compiled = unet(latents, torch.tensor([10]), encoder_hidden_states=embeds).sample
    uncompile(unet)
    assert not is_compiled(unet)
    assert torch.equal(compiled, eager)
