"""A whole benchmark run: build the model, measure in order, assemble the report.

The order matters: the cache is built first (training from the cache needs it), the
checkpoint saved before the restart (the restart resumes from it), and the in-memory
model freed before the restart loads the saved copy, so its memory is not held twice.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine.bench.cache_build import measure_cache_build
from engine.bench.data import SyntheticDataset
from engine.bench.data_path import measure_data_path
from engine.bench.flops import measure_flops, meta_forward_flops
from engine.bench.machine import load_average, machine_info, sdpa_backends
from engine.bench.models import (
    FULL_SIZE,
    attention_processors,
    base_from_pipeline,
    build_pipeline,
    parameter_count,
)
from engine.bench.overhead import measure_overhead
from engine.bench.peaks import device_peak_flops
from engine.bench.probes import memory_kind, release_memory
from engine.bench.report import BenchReport
from engine.bench.restart import (
    measure_checkpoint_save,
    measure_import_seconds,
    measure_restart,
    save_model,
)
from engine.bench.settings import BenchSettings, bench_task
from engine.bench.trainer import trainer_for
from engine.bench.training import measure_training
from engine.model.loading import BaseModel, weight_dtype

# the package's logger, so the log lines read "engine.bench: ..." from every module
log = logging.getLogger(__package__)


def describe_model(settings: BenchSettings, base: BaseModel) -> dict[str, Any]:
    return {
        "name": settings.model, "family": base.family.name,
        "full_size": settings.model in FULL_SIZE,
        "prediction_type": base.family.default_prediction_type,
        "weights": "random (throughput does not depend on weight values)",
        "unet_parameters": parameter_count(base.unet),
        "vae_parameters": parameter_count(base.vae),
        "text_encoder_parameters": [parameter_count(e) for e in base.text_encoders],
        "attention_processors": attention_processors(base.unet),
        "sdpa_backends_enabled": sdpa_backends() if base.device.type == "cuda" else None,
        "dtype": str(base.dtype).replace("torch.", ""),
    }


def lora_parameter_count(base: BaseModel, settings: BenchSettings, dataset: Any) -> int:
    task = bench_task(base.location, settings, settings.batch_sizes[0])
    with trainer_for(base, task, dataset, None, 0) as (trainer, _, _):
        return sum(p.numel() for p in trainer.params.values())


def run_benchmark(settings: BenchSettings, workdir: str | Path | None = None) -> BenchReport:
    """Measure everything ``settings`` asks for; returns the report (nothing printed)."""
    device = torch.device(settings.device)
    dtype = weight_dtype(settings.precision, device)
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if settings.threads:  # restored afterwards: the caller may be a test process
            torch.set_num_threads(settings.threads)
            stack.callback(torch.set_num_threads, threads)
        report = BenchReport(settings=asdict(settings), machine=machine_info(device))
        report.machine["load_average_start"] = load_average()
        report.machine["memory_measure"] = memory_kind(device)
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="loraflow-bench-"))
        _run_all(settings, device, dtype, Path(workdir), report)
        report.machine["load_average_end"] = load_average()
    report.checkpoint_save.pop("url", None)  # a temporary folder, gone by now
    report.notes += standing_notes(device)
    return report


def _run_all(settings: BenchSettings, device: torch.device, dtype: torch.dtype, workdir: Path,
             report: BenchReport) -> None:
    log.info("building %s (random weights)", settings.model)
    t0 = time.perf_counter()
    pipe = build_pipeline(settings.model)
    base = base_from_pipeline(pipe, device, dtype, f"memory:{settings.model}")
    report.model = describe_model(settings, base) | {"build_seconds": time.perf_counter() - t0}
    dataset = SyntheticDataset(max(settings.batch_sizes), settings.resolution)
    report.model["lora_parameters"] = lora_parameter_count(base, settings, dataset)
    log.info("cache build")
    report.cache_build, cache = measure_cache_build(base, settings, dataset, workdir)
    log.info("counting FLOPs")
    report.flops = measure_flops(base, settings, dataset, cache)
    peak_name, peak = device_peak_flops(device, settings.precision)
    report.flops |= {"device_peak_row": peak_name, "device_peak_flops": peak}
    if settings.model in FULL_SIZE:
        report.flops["unet_forward_per_sample_meta"] = meta_forward_flops(
            settings.model, settings.resolution)
    flops = {"cache": report.flops["train_step_per_sample"],
             "live": report.flops.get("train_step_live_per_sample")}
    report.training = measure_training(base, settings, dataset, cache, flops, peak)
    report.overhead = [  # the plain step's share that is not UNet compute
        {"batch_size": row["batch_size"]}
        | measure_overhead(base, bench_task(base.location, settings, row["batch_size"]),
                           dataset, cache, settings, row["step_seconds"])
        for row in report.training
        if row["inputs"] == "cache" and not row["levers"] and row["status"] == "ok"]
    if settings.data_path:
        log.info("data path")
        report.data_path = measure_data_path(base, settings, workdir)
    log.info("checkpoint save")
    report.checkpoint_save = measure_checkpoint_save(base, settings, dataset, cache, workdir)
    if not settings.restart:
        report.notes.append("restart not measured (--no-restart, or a smoke run of a "
                            "full-size model)")
        return
    log.info("saving the model for the restart measurement")
    model_dir = workdir / "model"
    saved = save_model(pipe, model_dir)
    del pipe, base, cache
    release_memory(device)
    log.info("restart")
    report.restart = measure_restart(model_dir, settings, dataset,
                                     report.checkpoint_save["url"], workdir)
    report.restart["save_model_seconds"] = saved
    report.restart["imports_seconds"] = None if settings.smoke else measure_import_seconds()
    baseline = baseline_row(report.training, settings.batch_sizes[0])
    if baseline:
        report.restart["ratio_to_step"] = report.restart["seconds"] / baseline["step_seconds"]


def baseline_row(rows: list[dict[str, Any]], batch_size: int) -> dict[str, Any] | None:
    """The plain row (from the cache, no lever) a restart is compared with."""
    for row in rows:
        if (row["batch_size"] == batch_size and row["inputs"] == "cache" and not row["levers"]
                and row["status"] == "ok"):
            return row
    return None


def standing_notes(device: torch.device) -> list[str]:
    notes = [
        "torch.compile and 8-bit AdamW are GPU levers loraflow does not offer yet; not measured.",
        "Attention: diffusers' default processor (AttnProcessor2_0 = "
        "torch.nn.functional.scaled_dot_product_attention); no xformers.",
    ]
    if device.type == "cpu":
        notes.append("CPU run: peak memory is the process's peak RSS and includes the "
                     "model weights; no MFU (no meaningful CPU peak).")
    return notes
