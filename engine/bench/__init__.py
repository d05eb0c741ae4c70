"""Benchmarks of the training engine: speed, memory, FLOPs and segment restart cost.

Why this lives in the engine: a benchmark is only worth quoting if it times the code that
trains. Every number here comes from :func:`engine.train.segment.build_trainer` and
:func:`engine.train.segment.train_step` fed by a :class:`engine.train.samples.SampleSource`,
the cache from :func:`engine.train.cache.ensure_cache`, checkpoints from the segment's own
save/restore and, for the restart, :func:`engine.model.loading.load_base_model` from a
diffusers folder.

What is measured, per family and resolution (medians over ``repeats`` runs):
- training samples/s from the cache (latents + text embeddings precomputed) and with
  VAE + text encoders run every step, per batch size, and with each lever on;
- cache build images/s;
- checkpoint save seconds; segment restart seconds (load base weights from a diffusers
  folder, restore the checkpoint, open the cache, first step) and its ratio to a steady
  step;
- peak memory (CUDA allocator peak on a GPU; peak resident set size on a CPU);
- FLOPs per sample of one real training step, counted by ``FlopCounterMode``, and on a
  GPU the model FLOPs utilisation against the device's dense peak;
- on request (``--data-path``), the data path's samples/s (decode + transforms, from the
  cache and live, 0 and 2 workers) beside the step's.

The rooms: ``settings`` (what to measure, the task it trains), ``models`` (full-size
configs built in memory, tiny models), ``data`` (synthetic images), ``trainer`` (one
engine trainer at a time), ``probes`` (sync, memory), ``flops`` (FLOP counts), ``peaks``
(device peak table, MFU), ``training`` (samples/s), ``data_path`` (decode + transforms
beside the step), ``cache_build``, ``restart`` (checkpoint save, segment restart),
``fixed_cost`` (a cold ``loraflow segment`` process phase by phase, ``--fixed-cost``),
``machine`` (what it ran on), ``report`` (JSON and markdown), ``run`` (the whole run in
order). This file only re-exports.

This package never imports Prefect; ``loraflow bench`` (flows/cli/bench.py) is its
command line.
"""

from engine.bench.data import SyntheticDataset
from engine.bench.data_path import measure_data_path
from engine.bench.flops import (
    count_step_flops,
    count_unet_forward_flops,
    flop_counter,
    measure_flops,
    meta_forward_flops,
)
from engine.bench.machine import machine_info
from engine.bench.models import (
    FAMILIES,
    FULL_SIZE,
    base_from_pipeline,
    build_modules,
    build_pipeline,
    load_bench_config,
    native_resolution,
    parameter_count,
)
from engine.bench.peaks import PEAK_FLOPS, device_peak_flops, peak_for_name, utilisation
from engine.bench.report import SCHEMA, BenchReport, render_markdown, write_outputs
from engine.bench.run import run_benchmark
from engine.bench.settings import LEVERS, BenchSettings, bench_task, make_settings
from engine.bench.trainer import trainer_for

__all__ = [
    "FAMILIES", "FULL_SIZE", "LEVERS", "PEAK_FLOPS", "SCHEMA",
    "BenchReport", "BenchSettings", "SyntheticDataset",
    "base_from_pipeline", "bench_task", "build_modules", "build_pipeline",
    "count_step_flops", "count_unet_forward_flops", "device_peak_flops", "flop_counter",
    "load_bench_config", "machine_info", "make_settings", "measure_data_path", "measure_flops",
    "meta_forward_flops", "native_resolution", "parameter_count", "peak_for_name",
    "render_markdown", "run_benchmark", "trainer_for", "utilisation", "write_outputs",
]
