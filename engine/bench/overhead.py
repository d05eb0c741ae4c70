"""How much of a training step is not the UNet: data, noise, loss, optimizer, logging.

Why: on a GPU the UNet's forward and backward are the work worth paying for; everything
else the step does (stacking the micro-batch and moving it, adding noise, the loss and
its weights, clipping, the AdamW update, the schedule, reading the loss) is overhead
that a faster kernel will not shrink. It is measured as the difference between a real
engine step (:func:`engine.train.trainer.train_step`) and the UNet's forward + backward
alone on the same micro-batch, so nothing is timed by a copy of the step's code.

The two are timed *interleaved*, one step then one UNet pass, each repeat on a fresh
trainer: on a shared machine the load drifts over seconds, and two medians taken a few
seconds apart differed by more than the overhead itself (measured: -6% to +9% for the
same code). Each repeat gives its own share; the row reports their median.
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
from engine.train.samples import Batch
from engine.train.trainer import Trainer, train_step


def unet_pass_seconds(trainer: Trainer, batch: Batch) -> float:
    """Seconds of one UNet forward + backward over ``batch`` (gradients into the trained
    weights, as in a step; cleared afterwards, as a step leaves them)."""
    base = trainer.base
    noisy = base.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    extra = unet_extra_inputs(base.family, batch.conditioning, batch.time_ids)
    synchronize(base.device)
    t0 = time.perf_counter()
    with trainer.autocast():
        prediction = base.unet(noisy, batch.timesteps, **extra).sample
    prediction.float().backward(torch.ones_like(prediction, dtype=torch.float32))
    synchronize(base.device)
    seconds = time.perf_counter() - t0
    trainer.optimizer.zero_grad(set_to_none=True)
    return seconds


def interleaved_repeat(base: BaseModel, task: TaskDefinition, dataset: Any, cache: Any,
                       settings: BenchSettings) -> tuple[float, float]:
    """(median step seconds, median UNet seconds per step) of one fresh trainer, a step
    and the UNet alone timed in turn."""
    warmup, count = max(settings.warmup, 1), settings.steps
    accumulation = task.train_args.gradient_accumulation_steps
    with trainer_for(base, task, dataset, cache, warmup + count) as (trainer, batches, source):
        batch = source.batch(source.prepare(trainer.plan.micro_batches(0)[0]))
        steps, unet = [], []
        for k in range(warmup + count):
            synchronize(base.device)
            t0 = time.perf_counter()
            train_step(trainer, batches, source)
            synchronize(base.device)
            step = time.perf_counter() - t0
            passes = sum(unet_pass_seconds(trainer, batch) for _ in range(accumulation))
            if k >= warmup:
                steps.append(step)
                unet.append(passes)
    return statistics.median(steps), statistics.median(unet)


def measure_overhead(base: BaseModel, task: TaskDefinition, dataset: Any, cache: Any,
                     settings: BenchSettings, training_step_seconds: float | None = None,
                     ) -> dict[str, Any]:
    """The step's non-UNet share: medians over ``settings.repeats`` interleaved repeats.

    ``training_step_seconds`` (the throughput row's median, timed apart) is kept beside
    it for reference; the share is computed from the interleaved times only.
    """
    repeats = [interleaved_repeat(base, task, dataset, cache, settings)
               for _ in range(max(settings.repeats, 1))]
    shares = [(step - unet) / step for step, unet in repeats]
    step = statistics.median(s for s, _ in repeats)
    unet = statistics.median(u for _, u in repeats)
    return {"step_seconds": step, "unet_forward_backward_seconds": unet,
            "overhead_seconds": step - unet, "overhead_fraction": statistics.median(shares),
            "overhead_fraction_per_repeat": shares,
            "training_step_seconds": training_step_seconds}
