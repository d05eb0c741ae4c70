"""How much of a training step is not the UNet: data, noise, loss, optimizer, logging.

Why: on a GPU the UNet's forward and backward are the work worth paying for; everything
else the step does (stacking the micro-batch and moving it, adding noise, the loss and
its weights, clipping, the AdamW update, the schedule, reading the loss) is overhead
that a faster kernel will not shrink. It is measured as the difference between a real
engine step (:func:`engine.train.trainer.train_step`) and the UNet's forward + backward
alone on the same micro-batch, each the median of the same number of runs, so nothing
is timed by a copy of the step's code.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from engine.bench.probes import synchronize
from engine.bench.settings import BenchSettings
from engine.bench.trainer import trainer_for
from engine.model.family import unet_extra_inputs
from engine.model.loading import BaseModel
from engine.task.definition import TaskDefinition
from engine.train.trainer import Trainer


def unet_compute_seconds(trainer: Trainer, batch: Any, count: int) -> list[float]:
    """Seconds of ``count`` UNet forward + backward passes over ``batch`` (gradients into
    the trained weights, as in a step; they are cleared after each pass)."""
    base = trainer.base
    noisy = base.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    extra = unet_extra_inputs(base.family, batch.conditioning, batch.time_ids)
    seconds = []
    for _ in range(count):
        synchronize(base.device)
        t0 = time.perf_counter()
        with trainer.autocast():
            prediction = base.unet(noisy, batch.timesteps, **extra).sample
        prediction.float().backward(torch.ones_like(prediction, dtype=torch.float32))
        synchronize(base.device)
        seconds.append(time.perf_counter() - t0)
        trainer.optimizer.zero_grad(set_to_none=True)
    return seconds


def measure_overhead(base: BaseModel, task: TaskDefinition, dataset: Any, cache: Any,
                     settings: BenchSettings, step_seconds: float) -> dict[str, Any]:
    """The step's non-UNet share, against a step of ``step_seconds`` (a median)."""
    with trainer_for(base, task, dataset, cache, 0) as (trainer, _, source):
        refs = trainer.plan.micro_batches(0)[0]
        batch = source.batch(source.prepare(refs))
        unet_compute_seconds(trainer, batch, max(settings.warmup, 1))
        unet = statistics.median(unet_compute_seconds(trainer, batch, settings.steps))
    accumulation = task.train_args.gradient_accumulation_steps
    unet_per_step = unet * accumulation
    overhead = step_seconds - unet_per_step
    return {"unet_forward_backward_seconds": unet_per_step,
            "overhead_seconds": overhead, "overhead_fraction": overhead / step_seconds}
