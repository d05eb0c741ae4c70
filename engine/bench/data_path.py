"""Data path throughput: samples/s of decoding and transforming, beside the step's.

Why: the data path (:meth:`engine.train.samples.SampleSource.prepare` over the segment's
:func:`engine.train.stream.micro_batch_stream`: image decode, resize, crop, flip, cache
lookups, noise and timestep draws) runs in ``dataloader_num_workers`` processes beside
the step. It is the bottleneck only if it makes fewer samples per second than the step
consumes. So for each resolution, inputs and worker count this measures, at one batch
size (medians of repeats):

- ``data_path``: samples/s of the stream alone (nothing consumes it but a counter);
- ``step``: samples/s of ``train_step`` on micro-batches prepared beforehand (the data
  path's cost taken out; the stacking, and the VAE in ``live``, stay in the step, as in
  :func:`engine.train.stream.batch_stream`);
- ``training``: samples/s of ``train_step`` fed by the stream, as a segment trains;
- ``ratio`` = data_path / step: above 1 the data path keeps up.

The images are JPEG files of photo-like content and mixed shapes (about 0.4 MP, the size
of a resized LoRA dataset), prepared by the engine's own :func:`load_dataset_for_task`,
so decoding is the real one. Inputs ``cache``: center crop, the latent posteriors from
:func:`ensure_cache` (nothing decoded). Inputs ``live``: random crop (latents cannot be
cached), so every sample is decoded, resized, cropped and encoded by the VAE in the step;
text embeddings are cached in both. Random flip is on in both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.bench.settings import BenchSettings, bench_task
from engine.bench.trainer import trainer_for
from engine.bench.training import timed_steps, typical_step
from engine.data.prepared import load_dataset_for_task, model_identity
from engine.model.loading import BaseModel
from engine.task.definition import TaskDefinition
from engine.train.cache import ensure_cache
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource
from engine.train.stream import micro_batch_stream, ready_batches

log = logging.getLogger(__package__)

#: (width, height) of the photos, cycled: 3:2, 2:3, 1:1, 16:9.
PHOTO_SIZES = ((768, 512), (512, 768), (640, 640), (896, 504))
PHOTO_COUNT = 32
JPEG_QUALITY = 90
WORKERS = (0, 2)
INPUTS = ("cache", "live")


def write_photos(folder: Path, count: int = PHOTO_COUNT, seed: int = 0) -> Path:
    """An imagefolder of ``count`` JPEGs: smooth gradients plus grain, like a photo's
    spectrum (pure noise would decode slower than any photo, flat colour faster)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(count):
            width, height = PHOTO_SIZES[i % len(PHOTO_SIZES)]
            y, x = np.mgrid[0:height, 0:width]
            phase = rng.uniform(0, 2 * np.pi, 3)
            channels = [127 + 100 * np.sin(x / (40 + 9 * c) + y / (55 + 7 * c) + phase[c])
                        for c in range(3)]
            pixels = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
            name = f"photo_{i:03d}.jpg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                folder / name, "JPEG", quality=JPEG_QUALITY)
            meta.write(json.dumps({"file_name": name, "text": f"a photo, number {i}"}) + "\n")
    return folder


def data_path_task(location: str, settings: BenchSettings, photos: Path, resolution: int,
                   batch_size: int, inputs: str, workers: int) -> TaskDefinition:
    """The bench's task on the photos: center crop for ``cache``, random crop for ``live``."""
    at = dataclasses.replace(settings, resolution=resolution)
    doc = bench_task(location, at, batch_size).model_dump(mode="json", exclude_none=True)
    doc["dataset"] = {"name": str(photos)}
    doc["transforms"] = {"center_crop": inputs == "cache", "random_flip": True}
    doc["dataloader_num_workers"] = workers
    return TaskDefinition.model_validate(doc)


def stream_samples_per_second(source: SampleSource, plan: TrainingPlan, steps: int,
                              workers: int) -> float:
    """Samples/s of the micro-batch stream alone, after its first ``workers`` batches
    (worker start-up; the consumer takes each batch at once, so nothing piles up ahead)."""
    stream = micro_batch_stream(source, plan, 0, steps, workers)
    try:
        for _ in range(workers):
            next(stream)
        samples, t0 = 0, time.perf_counter()
        for batch in stream:
            samples += len(batch)
        return samples / (time.perf_counter() - t0)
    finally:
        stream.close()


def step_samples_per_second(base: BaseModel, task: TaskDefinition, dataset: Any, cache: Any,
                            settings: BenchSettings, prepared: bool) -> float:
    """Median samples/s of ``train_step``, fed by the stream or by batches prepared first."""
    steps = settings.warmup + settings.steps
    with trainer_for(base, task, dataset, cache, steps) as (trainer, batches, source):
        stream = batches
        if prepared:  # every sample prepared first; made a Batch at its step, as in training
            batches.close()
            plan = trainer.plan
            stream = ready_batches(iter(list(micro_batch_stream(source, plan, 0, steps, 0))),
                                   source)
        try:
            timed_steps(trainer, stream, settings.warmup)
            seconds = typical_step(timed_steps(trainer, stream, settings.steps))
        finally:
            stream.close()
    return task.train_args.batch_size / seconds


def _median(repeats: int, measure: Any, *args: Any, **kwargs: Any) -> float:
    return statistics.median(measure(*args, **kwargs) for _ in range(repeats))


def measure_configuration(base: BaseModel, settings: BenchSettings, photos: Path,
                          data_root: Path, cache_root: Path, resolution: int, batch_size: int,
                          inputs: str) -> list[dict[str, Any]]:
    """Rows for one (resolution, batch, inputs): one per worker count."""
    task = data_path_task(base.location, settings, photos, resolution, batch_size, inputs, 0)
    dataset = load_dataset_for_task(task, str(data_root))
    cache = ensure_cache(task, base, dataset, str(cache_root), model_identity(base))
    plan = TrainingPlan.for_task(task, dataset)
    source = SampleSource(task, dataset, base, cache)
    repeats, steps = settings.repeats, settings.warmup + settings.steps
    step = _median(repeats, step_samples_per_second, base, task, dataset, cache, settings,
                   prepared=True)
    rows = []
    for workers in WORKERS:
        log.info("data path: %d px, batch %d, %s, %d workers", resolution, batch_size, inputs,
                 workers)
        fed = task.model_copy(update={"dataloader_num_workers": workers})
        data = _median(repeats, stream_samples_per_second, source, plan, steps, workers)
        training = _median(repeats, step_samples_per_second, base, fed, dataset, cache,
                           settings, prepared=False)
        rows.append({
            "resolution": resolution, "batch_size": batch_size, "inputs": inputs,
            "workers": workers, "data_path_samples_per_second": data,
            "step_samples_per_second": step, "training_samples_per_second": training,
            "ratio": data / step,
        })
    return rows


def measure_data_path(base: BaseModel, settings: BenchSettings,
                      workdir: Path) -> list[dict[str, Any]]:
    """Every row of the data-path table: resolutions x batch sizes x inputs x workers."""
    photos = write_photos(workdir / "photos")
    rows = []
    for resolution in settings.data_path:
        for batch_size in settings.batch_sizes:
            for inputs in INPUTS:
                rows += measure_configuration(base, settings, photos, workdir / "datasets",
                                              workdir / "data-path-cache", resolution,
                                              batch_size, inputs)
    return rows
