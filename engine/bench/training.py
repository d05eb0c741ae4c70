"""Training throughput: samples/s and peak memory per batch size, inputs and lever."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

from engine.bench.peaks import utilisation
from engine.bench.probes import (
    current_memory_bytes,
    peak_memory_bytes,
    release_memory,
    reset_peak_memory,
    synchronize,
)
from engine.bench.settings import BenchSettings, bench_task
from engine.bench.trainer import reset_unet, trainer_for
from engine.model.loading import BaseModel
from engine.task.definition import TaskDefinition
from engine.train.samples import Batch
from engine.train.segment import Trainer, train_step
from engine.train.stream import AHEAD

# the package's logger, so the log lines read "engine.bench: ..." from every module
log = logging.getLogger(__package__)

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def timed_steps(trainer: Trainer, batches: Iterator[Batch | None], count: int) -> list[float]:
    """Seconds of each of ``count`` optimizer steps."""
    device = trainer.base.device
    seconds = []
    for _ in range(count):
        synchronize(device)
        t0 = time.perf_counter()
        train_step(trainer, batches)
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def typical_step(seconds: list[float]) -> float:
    """The step time of a run of steps: the median, over consecutive runs of
    :data:`~engine.train.stream.AHEAD` steps, of their mean. From the cache the stream makes
    that many micro-batches in one step and none in the next ones, so a plain median would
    pick a step that made none; each run of that many steps holds every step's share
    (bursts start every AHEAD micro-batches and a step holds at least one). A short run
    (fewer steps) is one window."""
    width = min(AHEAD, len(seconds))
    windows = [seconds[k:k + width] for k in range(0, len(seconds) - width + 1, width)]
    return statistics.median(statistics.fmean(w) for w in windows)


def time_configuration(base: BaseModel, task: TaskDefinition, dataset: Any, cache: Any,
                       settings: BenchSettings) -> dict[str, Any]:
    """Median step time of one configuration over repeats, and its peak memory."""
    device = base.device
    release_memory(device)
    reset_peak_memory(device)
    before = current_memory_bytes(device)
    per_repeat = []
    for _ in range(settings.repeats):
        steps = settings.warmup + settings.steps
        with trainer_for(base, task, dataset, cache, steps) as (trainer, batches, source):
            timed_steps(trainer, batches, settings.warmup)
            per_repeat.append(typical_step(timed_steps(trainer, batches, settings.steps)))
    step = statistics.median(per_repeat)
    batch_size = task.train_args.batch_size
    return {
        "status": "ok",
        "step_seconds": step,
        "samples_per_second": batch_size / step,
        "samples_per_second_per_repeat": [batch_size / s for s in per_repeat],
        "peak_memory_bytes": peak_memory_bytes(device),
        "memory_before_bytes": before,  # weights, encoders, cache: held before training
    }


def configurations(settings: BenchSettings) -> list[tuple[str, dict[str, bool]]]:
    """(inputs, levers) pairs measured at every batch size: the baseline, live, each lever."""
    rows: list[tuple[str, dict[str, bool]]] = [("cache", {})]
    if settings.live:
        rows.append(("live", {}))
    rows += [("cache", {lever: True}) for lever in settings.levers]
    return rows


def measure_training(base: BaseModel, settings: BenchSettings, dataset: Any, cache: Any,
                     flops: dict[str, int | None], peak: float | None) -> list[dict[str, Any]]:
    """One row per batch size and configuration; a configuration out of memory says so."""
    rows = []
    for batch_size in settings.batch_sizes:
        for inputs, levers in configurations(settings):
            task = bench_task(base.location, settings, batch_size, levers)
            log.info("timing batch %d, %s, levers %s", batch_size, inputs, levers or "none")
            row: dict[str, Any] = {"batch_size": batch_size, "inputs": inputs,
                                   "levers": sorted(levers)}
            try:
                inputs_cache = cache if inputs == "cache" else None
                row |= time_configuration(base, task, dataset, inputs_cache, settings)
            except _OOM:
                reset_unet(base)
                release_memory(base.device)
                row |= {"status": "out of memory"}
            rows.append(row | utilisation(row, flops.get(inputs), peak))
    return rows
