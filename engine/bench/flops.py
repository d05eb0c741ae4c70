"""FLOPs of real training work, as torch's ``FlopCounterMode`` counts them.

One optimizer step through the engine's ``train_step`` (forward, backward, optimizer),
one UNet forward, and for full-size models a UNet forward counted on the meta device
(no weights, no compute) as a cross-check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.bench.models import build_modules, load_bench_config
from engine.bench.settings import BenchSettings, bench_task
from engine.bench.trainer import trainer_for
from engine.model.family import detect_family, unet_extra_inputs
from engine.model.loading import BaseModel
from engine.train.samples import Batch, SampleSource
from engine.train.segment import Trainer, train_step


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out: Any, query: Any, key: Any, value: Any, *args: Any,
                             out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> Any:
    """``FlopCounterMode`` that also counts attention on a CPU.

    torch counts the CUDA SDPA kernels (flash, efficient, cuDNN) but not the CPU one,
    which would leave the attention matmuls out of every CPU figure; the same formulas
    are registered for it here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _cpu_sdpa_backward_flops
        )
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_step_flops(trainer: Trainer, batches: Iterator[Batch | None]) -> int:
    """FLOPs of one real optimizer step (forward, backward, optimizer) as torch counts them."""
    with flop_counter() as counter:
        train_step(trainer, batches)
    return int(counter.get_total_flops())


def count_unet_forward_flops(trainer: Trainer, source: SampleSource) -> int:
    """FLOPs of one UNet forward over the trainer's next micro-batch (no gradients).

    The same inputs as in ``train_step`` (noised latents, the family's extra inputs);
    only the forward is counted: the report's step / forward ratio divides by it.
    """
    base = trainer.base
    refs = trainer.plan.micro_batches(trainer.global_step)[0]
    batch = source.batch(source.prepare(refs))
    noisy = base.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    extra = unet_extra_inputs(base.family, batch.conditioning, batch.time_ids)
    with torch.no_grad(), trainer.autocast(), flop_counter() as counter:
        base.unet(noisy, batch.timesteps, **extra)
    return int(counter.get_total_flops())


def meta_forward_flops(model: str, resolution: int, batch_size: int = 1) -> int:
    """FLOPs of one UNet forward of a full-size model, counted on the meta device.

    No weights, no compute: a cross-check of the measured count, and the work per sample
    of families too big to run here (SDXL at 1024 on a CPU). On meta tensors attention
    runs as plain matmuls, which torch counts on any device.
    """
    config = load_bench_config(model)
    family = detect_family(config["model_index"], config["unet"], config["scheduler"])
    with torch.device("meta"):
        unet = build_modules(model)["unet"]
        side = resolution // 8
        latents = torch.empty(batch_size, unet.config.in_channels, side, side)
        embeds = torch.empty(batch_size, 77, unet.config.cross_attention_dim)
        conditioning = {"prompt_embeds": embeds}
        time_ids = None
        if family.is_sdxl:
            pooled = config["text_encoder_2"]["projection_dim"]
            conditioning["pooled"] = torch.empty(batch_size, pooled)
            time_ids = torch.empty(batch_size, 6)
        extra = unet_extra_inputs(family, conditioning, time_ids)
        with torch.no_grad(), flop_counter() as counter:
            unet(latents, torch.zeros(batch_size, dtype=torch.long), **extra)
    return int(counter.get_total_flops())


def measure_flops(base: BaseModel, settings: BenchSettings, dataset: Any,
                  cache: Any) -> dict[str, Any]:
    """FLOPs per sample of one real training step (cached and live) and of a UNet forward."""
    batch_size = settings.batch_sizes[0]
    task = bench_task(base.location, settings, batch_size)
    out: dict[str, Any] = {"batch_size": batch_size, "counted_by": "torch FlopCounterMode"}
    with trainer_for(base, task, dataset, cache, 1) as (trainer, batches, source):
        out["unet_forward_per_sample"] = count_unet_forward_flops(trainer, source) / batch_size
        t0 = time.perf_counter()
        out["train_step_per_sample"] = count_step_flops(trainer, batches) / batch_size
        out["counted_step_seconds"] = time.perf_counter() - t0
    out["step_to_forward_ratio"] = out["train_step_per_sample"] / out["unet_forward_per_sample"]
    if settings.live:
        with trainer_for(base, task, dataset, None, 1) as (trainer, batches, source):
            live = count_step_flops(trainer, batches) / batch_size
            out["train_step_live_per_sample"] = live
        out["encoding_per_sample"] = live - out["train_step_per_sample"]
    return out
