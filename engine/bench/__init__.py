"""Benchmarks of the training engine: speed, memory, FLOPs and segment restart cost.

Why this lives in the engine: a benchmark is only worth quoting if it times the code that
trains. Every number here comes from :func:`engine.train.segment.build_trainer` and
:func:`engine.train.segment.train_step` fed by a :class:`engine.train.samples.SampleSource`, the cache
from :func:`engine.train.cache.ensure_cache`, checkpoints from the segment's own save/restore
and, for the restart, :func:`engine.model.loading.load_base_model` from a diffusers folder.

Full-size models (SD1.5, SD2.1 768-v, SDXL base) are built from the published configs in
``engine/bench/configs/*.json`` with random weights, in memory: throughput and memory do
not depend on weight values, and nothing is downloaded. The tokenizers are the tiny
embedded CLIP-style tokenizer (ids stay far below the real 49408-token vocabulary; the
sequence length, 77, is the real one), so the text encoders do the real amount of work.

What is measured, per family and resolution (medians over ``repeats`` runs):
- training samples/s from the cache (latents + text embeddings precomputed) and with
  VAE + text encoders run every step, per batch size, and with each lever on;
- cache build images/s;
- checkpoint save seconds; segment restart seconds (load base weights from a diffusers
  folder, restore the checkpoint, open the cache, first step) and its ratio to a steady
  step;
- peak memory (CUDA allocator peak on a GPU; peak resident set size on a CPU);
- FLOPs per sample of one real training step, counted by ``FlopCounterMode``, and on a
  GPU the model FLOPs utilisation against the device's dense peak.

This module never imports Prefect; ``loraflow bench`` (flows/commands_bench.py) is its
command line.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.data.prepared import model_identity
from engine.model.family import detect_family, unet_extra_inputs
from engine.model.loading import BaseModel, load_base_model, training_device, weight_dtype
from engine.store.commit import commit_checkpoint, read_checkpoint
from engine.task.definition import TaskDefinition
from engine.train.cache import ensure_cache
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource
from engine.train.segment import (
    Trainer,
    build_trainer,
    checkpoint_files,
    micro_batch_stream,
    restore,
    train_step,
)

log = logging.getLogger(__name__)

SCHEMA = "loraflow-bench/1"
CONFIG_DIR = Path(__file__).parent / "configs"

#: CLI family name -> model: a full-size config in bench_configs/ or an embedded tiny model.
FAMILIES: dict[str, str] = {
    "sd1": "sd15", "sd15": "sd15", "sd2": "sd21", "sd21": "sd21", "sdxl": "sdxl",
    "tiny-sd1": "tiny-sd1", "tiny-sd2": "tiny-sd2", "tiny-sdxl": "tiny-sdxl",
}
FULL_SIZE = ("sd15", "sd21", "sdxl")
LEVERS = ("gradient_checkpointing", "channels_last")

#: Dense (no sparsity) peak FLOP/s from vendor spec sheets, by a substring of the CUDA
#: device name; first match wins, so the more specific names come first. "tf32" applies
#: to fp32 training when torch lets matmuls use TF32, "fp32" otherwise.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM
    ("H200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
)

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# -- settings ---------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """What to measure; :func:`make_settings` fills the defaults."""

    family: str
    resolution: int
    batch_sizes: list[int]
    precision: str
    repeats: int
    steps: int
    warmup: int
    levers: list[str]
    rank: int = 4
    device: str = "cpu"
    threads: int | None = None
    smoke: bool = False
    live: bool = True
    restart: bool = True

    @property
    def model(self) -> str:
        return FAMILIES[self.family]


def make_settings(
    family: str | None = None, resolution: int | None = None,
    batch_sizes: list[int] | None = None, precision: str | None = None,
    repeats: int | None = None, steps: int | None = None, warmup: int | None = None,
    levers: list[str] | None = None, rank: int = 4, device: str | None = None,
    threads: int | None = None, smoke: bool = False, live: bool = True, restart: bool = True,
) -> BenchSettings:
    """Settings with defaults: a smoke run is seconds long, a full run quotable."""
    family = family or "tiny-sd1"
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    dev = torch.device(device) if device else training_device()
    unknown = sorted(set(levers or []) - set(LEVERS))
    if unknown:
        raise ValueError(f"unknown lever(s) {unknown}; available: {list(LEVERS)}")
    return BenchSettings(
        family=family,
        resolution=resolution or native_resolution(FAMILIES[family]),
        batch_sizes=batch_sizes or ([1, 2] if smoke else [1, 8, 32]),
        precision=precision or ("bf16" if dev.type == "cuda" else "no"),
        repeats=repeats or (1 if smoke else 3),
        steps=steps or (2 if smoke else 20),
        warmup=warmup if warmup is not None else (1 if smoke else 3),
        levers=list(LEVERS) if levers is None else levers,
        rank=rank,
        device=str(dev),
        threads=threads,
        smoke=smoke,
        live=live,
        # smoke runs never write a multi-GB full-size model to disk
        restart=restart and not (smoke and FAMILIES[family] in FULL_SIZE),
    )


# -- models -------------------------------------------------------------------------------


def load_bench_config(model: str) -> dict[str, Any]:
    """The published component configs of a full-size model (see bench_configs/)."""
    if model not in FULL_SIZE:
        raise ValueError(f"no full-size config for {model!r}; expected one of {FULL_SIZE}")
    return json.loads((CONFIG_DIR / f"{model}.json").read_text(encoding="utf-8"))


def native_resolution(model: str) -> int:
    return int(load_bench_config(model)["native_resolution"]) if model in FULL_SIZE else 64


def _text_encoder(config: dict[str, Any]) -> Any:
    """A CLIP text model (with projection when the config says so) from a config dict."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    values = {k: v for k, v in config.items() if not k.startswith("_")}
    projected = config["_architecture"] == "CLIPTextModelWithProjection"
    cls = CLIPTextModelWithProjection if projected else CLIPTextModel
    return cls(CLIPTextConfig(**values)).eval()


def build_modules(model: str) -> dict[str, Any]:
    """UNet, VAE and text encoder(s) of a full-size model, on the current default device.

    Under ``with torch.device("meta")`` this builds the architecture without allocating
    weights (cheap enough for a unit test of SDXL's 2.6 B parameters).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = load_bench_config(model)
    modules = {
        "unet": UNet2DConditionModel(**config["unet"]).eval(),
        "vae": AutoencoderKL(**config["vae"]).eval(),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in config:
            modules[name] = _text_encoder(config[name])
    return modules


def build_pipeline(model: str) -> Any:
    """A diffusers pipeline with random weights (fp32, CPU), full-size or tiny.

    A pipeline object rather than loose modules because the restart measurement saves it
    with ``save_pretrained`` and loads it back the way a segment loads a base model.
    """
    if model not in FULL_SIZE:
        from engine.model.embedded.tiny_models import build_tiny_pipeline

        return build_tiny_pipeline(model)
    import diffusers

    from engine.model.embedded.tiny_models import make_tokenizer

    config = load_bench_config(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        modules = build_modules(model)
    scheduler_config = dict(config["scheduler"])
    scheduler = getattr(diffusers, scheduler_config.pop("_class_name")).from_config(scheduler_config)
    tokenizers = {name: make_tokenizer(config[name]["pad_token"])
                  for name in ("tokenizer", "tokenizer_2") if name in config}
    pipeline_class = getattr(diffusers, config["model_index"]["_class_name"])
    extra: dict[str, Any] = (
        {"force_zeros_for_empty_prompt": True, "add_watermarker": False}
        if "text_encoder_2" in modules
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    return pipeline_class(**modules, **tokenizers, scheduler=scheduler, **extra)


def base_from_pipeline(pipe: Any, device: torch.device, dtype: torch.dtype,
                       location: str) -> BaseModel:
    """The frozen base as :func:`engine.model.loading.load_base_model` would hand it over.

    Same placement and dtypes: UNet in the weight dtype left on the CPU (build_trainer
    moves it), VAE in fp32 under fp16 (it overflows) else in the weight dtype, text
    encoders in the weight dtype; all frozen. The family is detected from the configs.
    """
    from diffusers import DDPMScheduler

    index = {"_class_name": type(pipe).__name__}
    family = detect_family(index, dict(pipe.unet.config), dict(pipe.scheduler.config))
    unet = _placed(pipe.unet, torch.device("cpu"), dtype)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    base = BaseModel(location, family, device, dtype, unet, noise_scheduler)
    base.vae = _placed(pipe.vae, device, torch.float32 if dtype == torch.float16 else dtype)
    for tok_dir, enc_dir in family.text_encoders:
        base.tokenizers.append(getattr(pipe, tok_dir))
        base.text_encoders.append(_placed(getattr(pipe, enc_dir), device, dtype))
    return base


def _placed(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Frozen, in eval mode, on ``device``; cast only when the dtype differs (diffusers
    warns on every ``.to(dtype)``)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module.to(device).eval().requires_grad_(False)


def parameter_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def attention_processors(unet: Any) -> list[str]:
    """Class names of the UNet's attention processors (AttnProcessor2_0 = torch SDPA)."""
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})


# -- data ---------------------------------------------------------------------------------


class SyntheticDataset:
    """Random RGB images with one caption each, in memory.

    It has the interface :class:`engine.train.samples.SampleSource` and the cache read from a
    prepared dataset (``__len__``, ``captions``, ``size``, ``image``, ``content_hash``),
    so the bench needs no files. Images are exactly ``resolution`` square, so resizing
    costs nothing and the crop is the whole image.
    """

    def __init__(self, count: int, resolution: int, seed: int = 0) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        self._images = [
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
            for _ in range(count)
        ]
        self._resolution = resolution
        key = f"synthetic:{count}:{resolution}:{seed}"
        self._hash = hashlib.sha256(key.encode()).hexdigest()[:32]

    @property
    def content_hash(self) -> str:
        return self._hash

    def __len__(self) -> int:
        return len(self._images)

    def captions(self, i: int) -> list[str]:
        return [f"a photo of synthetic sample {i}"]

    def size(self, i: int) -> tuple[int, int]:
        return (self._resolution, self._resolution)

    def image(self, i: int) -> Any:
        return self._images[i]


def bench_task(location: str, settings: BenchSettings, batch_size: int,
               levers: dict[str, bool] | None = None) -> TaskDefinition:
    """A task that trains for as long as the bench asks: constant lr, center crop, cache on."""
    doc = {
        "model": {"name": location},
        "dataset": {"name": "loraflow/bench-synthetic"},
        "validation": {"num_images": 1},
        "train_args": {
            "learning_rate": 1e-4, "batch_size": batch_size, "scale_lr": False,
            "resolution": settings.resolution, "max_train_steps": 1_000_000,
            "num_train_steps": 1_000_000, "cache": "auto",
            "lr_scheduler": {"lr_scheduler": "constant", "lr_warmup_steps": 0},
            **(levers or {}),
        },
        "lora": {"rank": settings.rank},
        "transforms": {"center_crop": True, "random_flip": False},
        "mixed_precision": settings.precision,
        "seed": 0,
    }
    return TaskDefinition.model_validate(doc)


# -- timing, memory, FLOPs ----------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures work done, not work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator stats, or Linux's VmHWM via /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _proc_status_bytes(field_name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return None


def current_memory_bytes(device: torch.device) -> int | None:
    """What is held now (weights, cache): CUDA allocated, or the resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _proc_status_bytes("VmRSS")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset: CUDA max allocated, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak_rss = _proc_status_bytes("VmHWM")
    if peak_rss is not None:
        return peak_rss
    # no /proc: the peak since the process started (ru_maxrss is KiB on Linux, bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_kind(device: torch.device) -> str:
    """What the memory columns mean on this machine (they are not comparable across kinds)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset per configuration"
    if os.access("/proc/self/clear_refs", os.W_OK):
        return "peak RSS (VmHWM), reset per configuration"
    return "peak RSS since the process started (no /proc/self/clear_refs)"


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


def count_step_flops(trainer: Trainer, batches: Iterator[list[Any]], source: SampleSource) -> int:
    """FLOPs of one real optimizer step (forward, backward, optimizer) as torch counts them."""
    with flop_counter() as counter:
        train_step(trainer, batches, source)
    return int(counter.get_total_flops())


def count_unet_forward_flops(trainer: Trainer, source: SampleSource) -> int:
    """FLOPs of one UNet forward over the trainer's next micro-batch (no gradients)."""
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
        latents = torch.empty(batch_size, unet.config.in_channels, resolution // 8, resolution // 8)
        conditioning = {"prompt_embeds": torch.empty(batch_size, 77, unet.config.cross_attention_dim)}
        time_ids = None
        if family.is_sdxl:
            pooled = config["text_encoder_2"]["projection_dim"]
            conditioning["pooled"] = torch.empty(batch_size, pooled)
            time_ids = torch.empty(batch_size, 6)
        extra = unet_extra_inputs(family, conditioning, time_ids)
        with torch.no_grad(), flop_counter() as counter:
            unet(latents, torch.zeros(batch_size, dtype=torch.long), **extra)
    return int(counter.get_total_flops())


def device_peak_flops(device: torch.device, precision: str) -> tuple[str | None, float | None]:
    """(table row, dense peak FLOP/s) of a CUDA device in this precision, or (None, None)."""
    if device.type != "cuda":
        return None, None
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return peak_for_name(torch.cuda.get_device_name(device), precision, tf32=tf32)


def peak_for_name(name: str, precision: str, *, tf32: bool = False) -> tuple[str | None, float | None]:
    """Look a device name up in :data:`PEAK_FLOPS`: (matched row, FLOP/s) or (None, None)."""
    key = "bf16" if precision in ("bf16", "fp16") else ("tf32" if tf32 else "fp32")
    for pattern, peaks in PEAK_FLOPS:
        if pattern in name:
            return pattern, peaks[key]
    return None, None


# -- one trainer at a time ----------------------------------------------------------------


@contextlib.contextmanager
def trainer_for(base: BaseModel, task: TaskDefinition, dataset: Any, cache: Any,
                steps: int) -> Iterator[tuple[Trainer, Iterator[list[Any]], SampleSource]]:
    """A fresh trainer (new adapter, new optimizer) and a stream of ``steps`` steps' batches.

    The UNet is shared by every configuration, so on exit the adapter is unloaded and
    the levers switched off again: each configuration starts from the same plain UNet.
    Memory is released by the next measurement that needs a clean peak (a full garbage
    collection costs ~0.25 s with torch, diffusers and transformers loaded).
    """
    plan = TrainingPlan.for_task(task, len(dataset))
    trainer = build_trainer(task, base, plan)
    try:
        source = SampleSource(task, dataset, base, cache)
        batches = micro_batch_stream(source, plan, 0, steps, task.dataloader_num_workers)
        yield trainer, batches, source
    finally:
        reset_unet(base)


def reset_unet(base: BaseModel) -> None:
    unet = base.unet
    if getattr(unet, "peft_config", None):
        unet.unload_lora()
    if unet.is_gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    unet.to(memory_format=torch.contiguous_format)
    unet.eval().requires_grad_(False)


def release_memory(device: torch.device) -> None:
    """Free what the last configuration left, so the next one's peak is its own.

    On a CPU, glibc keeps freed heap pages mapped (they still count as resident), so
    they are handed back to the OS with ``malloc_trim`` before the peak is reset.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def timed_steps(trainer: Trainer, batches: Iterator[list[Any]], source: SampleSource,
                count: int) -> list[float]:
    """Seconds of each of ``count`` optimizer steps."""
    device = trainer.base.device
    seconds = []
    for _ in range(count):
        synchronize(device)
        t0 = time.perf_counter()
        train_step(trainer, batches, source)
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


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
            timed_steps(trainer, batches, source, settings.warmup)
            per_repeat.append(statistics.median(timed_steps(trainer, batches, source, settings.steps)))
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


# -- the measurements -------------------------------------------------------------------


def configurations(settings: BenchSettings) -> list[tuple[str, dict[str, bool]]]:
    """(inputs, levers) pairs measured at every batch size: the baseline, live, each lever."""
    rows: list[tuple[str, dict[str, bool]]] = [("cache", {})]
    if settings.live:
        rows.append(("live", {}))
    rows += [("cache", {lever: True}) for lever in settings.levers]
    return rows


def measure_training(base: BaseModel, settings: BenchSettings, dataset: Any, cache: Any,
                     flops: dict[str, int | None], peak: float | None) -> list[dict[str, Any]]:
    rows = []
    for batch_size in settings.batch_sizes:
        for inputs, levers in configurations(settings):
            task = bench_task(base.location, settings, batch_size, levers)
            log.info("timing batch %d, %s, levers %s", batch_size, inputs, levers or "none")
            row: dict[str, Any] = {"batch_size": batch_size, "inputs": inputs,
                                   "levers": sorted(levers)}
            try:
                row |= time_configuration(base, task, dataset, cache if inputs == "cache" else None,
                                          settings)
            except _OOM:
                reset_unet(base)
                release_memory(base.device)
                row |= {"status": "out of memory"}
            rows.append(row | utilisation(row, flops.get(inputs), peak))
    return rows


def utilisation(row: dict[str, Any], flops_per_sample: int | None,
                peak: float | None) -> dict[str, Any]:
    """Achieved model FLOP/s and, with a known device peak, the utilisation (MFU).

    Model FLOPs are those of a step without gradient checkpointing: the recomputation a
    lever adds is overhead, not useful work, so it does not raise the utilisation.
    """
    if row.get("status") != "ok" or not flops_per_sample:
        return {"achieved_tflops": None, "mfu": None}
    achieved = flops_per_sample * row["samples_per_second"]
    return {"achieved_tflops": achieved / 1e12, "mfu": achieved / peak if peak else None}


def measure_flops(base: BaseModel, settings: BenchSettings, dataset: Any,
                  cache: Any) -> dict[str, Any]:
    """FLOPs per sample of one real training step (cached and live) and of a UNet forward."""
    batch_size = settings.batch_sizes[0]
    task = bench_task(base.location, settings, batch_size)
    out: dict[str, Any] = {"batch_size": batch_size, "counted_by": "torch FlopCounterMode"}
    with trainer_for(base, task, dataset, cache, 1) as (trainer, batches, source):
        out["unet_forward_per_sample"] = count_unet_forward_flops(trainer, source) / batch_size
        t0 = time.perf_counter()
        out["train_step_per_sample"] = count_step_flops(trainer, batches, source) / batch_size
        out["counted_step_seconds"] = time.perf_counter() - t0
    out["step_to_forward_ratio"] = out["train_step_per_sample"] / out["unet_forward_per_sample"]
    if settings.live:
        with trainer_for(base, task, dataset, None, 1) as (trainer, batches, source):
            out["train_step_live_per_sample"] = count_step_flops(trainer, batches, source) / batch_size
        out["encoding_per_sample"] = out["train_step_live_per_sample"] - out["train_step_per_sample"]
    return out


def measure_cache_build(base: BaseModel, settings: BenchSettings, dataset: Any,
                        workdir: Path) -> tuple[dict[str, Any], Any]:
    """Images/s of building (encoding and committing) the cache; returns the last cache."""
    task = bench_task(base.location, settings, settings.batch_sizes[0])
    seconds, cache = [], None
    for r in range(settings.repeats):
        root = workdir / f"cache-{r}"
        synchronize(base.device)
        t0 = time.perf_counter()
        cache = ensure_cache(task, base, dataset, str(root), model_identity(base))
        synchronize(base.device)
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {"images": len(dataset), "seconds": median, "images_per_second": len(dataset) / median,
            "includes": "VAE encode of every image, text encode of every caption, commit"}, cache


def measure_checkpoint_save(base: BaseModel, settings: BenchSettings, dataset: Any, cache: Any,
                            workdir: Path) -> dict[str, Any]:
    """Seconds to serialise and commit a checkpoint after one step (AdamW moments exist)."""
    task = bench_task(base.location, settings, settings.batch_sizes[0])
    seconds, size, url = [], 0, ""
    with trainer_for(base, task, dataset, cache, 1) as (trainer, batches, source):
        train_step(trainer, batches, source)
        for r in range(settings.repeats):
            url = str(workdir / f"checkpoint-{r}")
            t0 = time.perf_counter()
            files = checkpoint_files(trainer, {"started_from_step": 0})
            commit_checkpoint(url, files, meta={"global_step": trainer.global_step,
                                                "task_fingerprint": "bench", "finished": False})
            seconds.append(time.perf_counter() - t0)
            size = sum(len(data) for data in files.values())
    return {"seconds": statistics.median(seconds), "bytes": size, "url": url}


def save_model(pipe: Any, folder: Path) -> float:
    """Write the in-memory pipeline as a diffusers folder (safetensors); returns seconds."""
    t0 = time.perf_counter()
    pipe.save_pretrained(folder, safe_serialization=True)
    return time.perf_counter() - t0


def restart_once(location: str, settings: BenchSettings, dataset: Any, checkpoint: str,
                 cache_root: Path) -> dict[str, float]:
    """One segment start, as run_segment does it, in seconds per phase."""
    device = torch.device(settings.device)
    task = bench_task(location, settings, settings.batch_sizes[0])
    t0 = time.perf_counter()
    base = load_base_model(task, device)
    synchronize(device)
    t1 = time.perf_counter()
    plan = TrainingPlan.for_task(task, len(dataset))
    trainer = build_trainer(task, base, plan)
    restore(trainer, read_checkpoint(checkpoint))
    cache = ensure_cache(task, base, dataset, str(cache_root), model_identity(base))
    source = SampleSource(task, dataset, base, cache)
    batches = micro_batch_stream(source, plan, trainer.global_step, trainer.global_step + 1, 0)
    synchronize(device)
    t2 = time.perf_counter()
    train_step(trainer, batches, source)
    synchronize(device)
    t3 = time.perf_counter()
    del trainer, base, cache, source, batches
    release_memory(device)
    # setup: the adapter, the UNet moved to the device, the checkpoint restored, the cache opened
    return {"seconds": t3 - t0, "load_seconds": t1 - t0, "setup_seconds": t2 - t1,
            "first_step_seconds": t3 - t2}


def measure_restart(model_dir: Path, settings: BenchSettings, dataset: Any,
                    checkpoint: str, workdir: Path) -> dict[str, Any]:
    """Median restart over repeats, after one untimed start that warms the page cache and
    builds the cache for the on-disk model (its fingerprint differs from the in-memory one)."""
    cache_root = workdir / "restart-cache"
    restart_once(str(model_dir), settings, dataset, checkpoint, cache_root)
    runs = [restart_once(str(model_dir), settings, dataset, checkpoint, cache_root)
            for _ in range(settings.repeats)]
    result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result["batch_size"] = settings.batch_sizes[0]
    result["weights_in_page_cache"] = True
    return result


def measure_import_seconds() -> float:
    """Wall time of a fresh interpreter importing the segment code (torch, diffusers, ...)."""
    code = "import engine.train.segment, engine.model.loading, diffusers, transformers, peft"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2],
                   capture_output=True)
    return time.perf_counter() - t0


# -- the machine --------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on; a figure without its machine is not a figure."""
    import diffusers
    import peft
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device), "gpu": None, "gpu_memory_bytes": None,
        "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory,
                 "cuda": torch.version.cuda}
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- the whole run ------------------------------------------------------------------------


@dataclass
class BenchReport:
    """The JSON document a run produces (see :func:`render_markdown` for the table)."""

    settings: dict[str, Any]
    machine: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)
    cache_build: dict[str, Any] = field(default_factory=dict)
    training: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_save: dict[str, Any] = field(default_factory=dict)
    restart: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    schema: str = SCHEMA
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def sdpa_backends() -> dict[str, bool]:
    """Which fused attention kernels torch may pick (they matter on a GPU only)."""
    cuda = torch.backends.cuda
    return {"flash": cuda.flash_sdp_enabled(), "mem_efficient": cuda.mem_efficient_sdp_enabled(),
            "math": cuda.math_sdp_enabled()}


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
    log.info("checkpoint save")
    report.checkpoint_save = measure_checkpoint_save(base, settings, dataset, cache, workdir)
    if not settings.restart:
        report.notes.append("restart not measured (--no-restart, or a smoke run of a full-size model)")
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


# -- output -------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def _gib(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:.0f} MiB"


def _flop(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e12:.3f} TFLOP" if value >= 1e11 else f"{value / 1e9:.3f} GFLOP"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a header with machine and command, then tables."""
    s, m, mach = report["settings"], report["model"], report["machine"]
    device = mach["gpu"] or f"CPU {mach['cpu']} ({mach['cpu_count']} cores)"
    lines = [
        f"### loraflow bench: {s['family']} at {s['resolution']} px, precision {s['precision']}",
        "",
        f"- date: {report['date']}; machine: {device}; torch {mach['torch']} "
        f"({mach['torch_threads']} threads), diffusers {mach['diffusers']}",
        f"- load average at start / end: {mach.get('load_average_start')} / "
        f"{mach.get('load_average_end')}",
        f"- command: `{report['command'] or '(library call)'}`",
        f"- medians of {s['repeats']} run(s) x {s['steps']} steps after {s['warmup']} warm-up "
        f"step(s); LoRA rank {s['rank']} ({m.get('lora_parameters')} parameters); UNet "
        f"{m['unet_parameters'] / 1e6:.1f} M parameters; attention "
        f"{', '.join(m['attention_processors'])}",
        "",
        "| batch | inputs | levers | samples/s | step s | peak memory | peak - before "
        "| achieved TFLOP/s | MFU |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["training"]:
        levers = ", ".join(row["levers"]) or "none"
        if row["status"] != "ok":
            lines.append(f"| {row['batch_size']} | {row['inputs']} | {levers} | "
                         f"{row['status']} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row['batch_size']} | {row['inputs']} | {levers} | "
            f"{_fmt(row['samples_per_second'])} | {_fmt(row['step_seconds'], '.3f')} | "
            f"{_gib(row['peak_memory_bytes'])} | {_gib(_growth(row))} | "
            f"{_fmt(row['achieved_tflops'], '.3f')} | "
            f"{_fmt(row['mfu'] and row['mfu'] * 100, '.1f', '%')} |"
        )
    lines += ["", "| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report)]
    return "\n".join(lines) + "\n"


def _growth(row: dict[str, Any]) -> int | None:
    """Memory the training itself added (activations, gradients, optimizer state)."""
    if row.get("memory_before_bytes") is None:
        return None
    return row["peak_memory_bytes"] - row["memory_before_bytes"]


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    f, c, k, r = report["flops"], report["cache_build"], report["checkpoint_save"], report["restart"]
    rows = [
        ("FLOPs per sample, training step from the cache (batch "
         f"{f['batch_size']})", _flop(f["train_step_per_sample"])),
        ("FLOPs per sample, UNet forward", _flop(f["unet_forward_per_sample"])),
        ("step / forward FLOPs", _fmt(f["step_to_forward_ratio"], ".2f", "x")),
    ]
    if f.get("unet_forward_per_sample_meta") is not None:
        rows.insert(2, ("same, counted on the meta device (no weights)",
                        _flop(f["unet_forward_per_sample_meta"])))
    if f.get("encoding_per_sample") is not None:
        rows.append(("FLOPs per sample, VAE + text encoding (live - cached)",
                     _flop(f["encoding_per_sample"])))
    rows += [
        (f"cache build ({c['images']} images)", _fmt(c["images_per_second"], ".2f", " images/s")),
        (f"checkpoint save ({k['bytes'] / 1e6:.2f} MB)", _fmt(k["seconds"], ".3f", " s")),
    ]
    if r:
        rows += [
            (f"segment restart (load + restore + first step, batch {r['batch_size']})",
             _fmt(r["seconds"], ".2f", " s")),
            ("  of which: load base weights / adapter + UNet to device + restore checkpoint "
             "+ open cache / first step",
             f"{r['load_seconds']:.2f} / {r['setup_seconds']:.2f} / "
             f"{r['first_step_seconds']:.2f} s"),
            ("restart / steady step", _fmt(r.get("ratio_to_step"), ".1f", "x")),
            ("fresh-process imports (not in the restart figure)",
             _fmt(r.get("imports_seconds"), ".2f", " s")),
        ]
    return rows


def write_outputs(report: BenchReport, json_path: str | None, markdown_path: str | None) -> str:
    """Write the JSON and markdown files asked for; returns the markdown."""
    document = report.to_dict()
    markdown = render_markdown(document)
    if json_path:
        Path(json_path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if markdown_path:
        Path(markdown_path).write_text(markdown, encoding="utf-8")
    return markdown
