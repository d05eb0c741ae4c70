"""What a benchmark measures: its settings, and the engine task each measurement trains.

The bench trains through the engine's own :class:`engine.task.definition.TaskDefinition`,
so a lever measured here is the very switch a user sets in a task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.bench.models import FAMILIES, FULL_SIZE, native_resolution
from engine.model.loading import training_device
from engine.task.definition import TaskDefinition

LEVERS = ("gradient_checkpointing", "channels_last")


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
    data_path: list[int] = field(default_factory=list)  # resolutions; empty: not measured

    @property
    def model(self) -> str:
        return FAMILIES[self.family]


def make_settings(
    family: str | None = None, resolution: int | None = None,
    batch_sizes: list[int] | None = None, precision: str | None = None,
    repeats: int | None = None, steps: int | None = None, warmup: int | None = None,
    levers: list[str] | None = None, rank: int = 4, device: str | None = None,
    threads: int | None = None, smoke: bool = False, live: bool = True, restart: bool = True,
    data_path: list[int] | None = None,
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
        data_path=list(data_path or []),
    )


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
