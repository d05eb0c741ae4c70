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
same code). The share is taken *per pair*, (step - its UNet pass) / step, and the row
reports the median over every pair of every repeat: on a 2-vCPU VM the very same UNet
pass took 28 to 51 ms within one minute (p10 30, p90 45), in stretches of a few passes,
so the difference of two medians over 20 steps still moved by several percent between
repeats, while a pair, ~80 ms long, sees the same stretch. Each repeat's own median
share is kept for the spread.

The pairs are taken :data:`~engine.train.stream.AHEAD` at a time: from the cache, the
stream makes that many micro-batches in one step and none in the next ones, so one pair
alone would show a step with all of that work or none of it. A window of that many
consecutive pairs holds every step's share (see :func:`engine.bench.training.typical_step`),
and the share and overhead reported are medians over windows, each window's share its
summed difference over its summed step time.
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
from engine.train.stream import AHEAD
from engine.train.trainer import Trainer, train_step


def unet_pass_seconds(trainer: Trainer, batch: Batch) -> float:
    """Seconds of one UNet forward + backward over ``batch`` (gradients into the trained
    weights, as in a step; cleared afterwards, as a step leaves them).

    The time includes tearing down the pass's autograd graph, as the step's time does when
    its loss goes: the UNet's graph is what there is to tear down (0.27 ms on tiny-sd1,
    batch 8; left outside, it was counted as the step's overhead)."""
    base = trainer.base
    noisy = base.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    extra = unet_extra_inputs(base.family, batch.conditioning, batch.time_ids)
    synchronize(base.device)
    t0 = time.perf_counter()
    with trainer.autocast():
        prediction = base.unet(noisy, batch.timesteps, **extra).sample
    prediction.float().backward(torch.ones_like(prediction, dtype=torch.float32))
    del prediction  # the graph's nodes go with it
    synchronize(base.device)
    seconds = time.perf_counter() - t0
    trainer.optimizer.zero_grad(set_to_none=True)
    return seconds


def interleaved_repeat(base: BaseModel, task: TaskDefinition, dataset: Any, cache: Any,
                       settings: BenchSettings) -> list[tuple[float, float]]:
    """(step seconds, seconds of the UNet passes right after it) of each timed step of one
    fresh trainer, a step and the UNet alone timed in turn."""
    warmup, count = max(settings.warmup, 1), settings.steps
    accumulation = task.train_args.gradient_accumulation_steps
    pairs = []
    with trainer_for(base, task, dataset, cache, warmup + count) as (trainer, batches, source):
        batch = source.batch(source.prepare(trainer.plan.micro_batches(0)[0]))
        for k in range(warmup + count):
            synchronize(base.device)
            t0 = time.perf_counter()
            train_step(trainer, batches)
            synchronize(base.device)
            step = time.perf_counter() - t0
            passes = sum(unet_pass_seconds(trainer, batch) for _ in range(accumulation))
            if k >= warmup:
                pairs.append((step, passes))
    return pairs


def measure_overhead(base: BaseModel, task: TaskDefinition, dataset: Any, cache: Any,
                     settings: BenchSettings, training_step_seconds: float | None = None,
                     ) -> dict[str, Any]:
    """The step's non-UNet share: the median over the pairs of ``settings.repeats``
    interleaved repeats (see the module docstring).

    ``training_step_seconds`` (the throughput row's median, timed apart) is kept beside
    it for reference; the share is computed from the interleaved times only.
    """
    timed = [interleaved_repeat(base, task, dataset, cache, settings)
             for _ in range(max(settings.repeats, 1))]
    repeats = [windows(pairs) for pairs in timed]
    every = [w for repeat in repeats for w in repeat]
    return {"step_seconds": statistics.median(s for s, _ in every),
            "unet_forward_backward_seconds": statistics.median(u for _, u in every),
            "overhead_seconds": statistics.median(s - u for s, u in every),
            "overhead_fraction": statistics.median((s - u) / s for s, u in every),
            "overhead_fraction_per_repeat": [statistics.median((s - u) / s for s, u in repeat)
                                             for repeat in repeats],
            "pairs": sum(map(len, timed)), "windows": len(every),
            "training_step_seconds": training_step_seconds}


def windows(pairs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(mean step seconds, mean UNet seconds) of each run of AHEAD consecutive pairs (all
    of them, when fewer); a shorter run left at the end is not used."""
    width = min(AHEAD, len(pairs))
    runs = [pairs[k:k + width] for k in range(0, len(pairs) - width + 1, width)]
    return [(statistics.fmean(s for s, _ in run), statistics.fmean(u for _, u in run))
            for run in runs]
