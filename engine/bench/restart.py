"""What a segment boundary costs: committing a checkpoint, and starting again from it.

The restart is timed phase by phase in the order ``run_segment`` runs them (load the
base model from a diffusers folder, build the trainer, restore the checkpoint, open the
cache, first step), each phase through the engine function the segment itself calls.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.bench.probes import release_memory, synchronize
from engine.bench.settings import BenchSettings, bench_task
from engine.bench.trainer import trainer_for
from engine.data.prepared import model_identity
from engine.model.loading import BaseModel, load_base_model
from engine.store.commit import commit_checkpoint, read_checkpoint
from engine.train.cache import ensure_cache
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource
from engine.train.segment import (
    batch_stream,
    build_trainer,
    checkpoint_files,
    restore,
    train_step,
)


def measure_checkpoint_save(base: BaseModel, settings: BenchSettings, dataset: Any, cache: Any,
                            workdir: Path) -> dict[str, Any]:
    """Seconds to serialise and commit a checkpoint after one step (AdamW moments exist)."""
    task = bench_task(base.location, settings, settings.batch_sizes[0])
    seconds, size, url = [], 0, ""
    with trainer_for(base, task, dataset, cache, 1) as (trainer, batches, source):
        train_step(trainer, batches)
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
    batches = batch_stream(source, plan, trainer.global_step, trainer.global_step + 1, 0)
    synchronize(device)
    t2 = time.perf_counter()
    train_step(trainer, batches)
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
