"""One engine trainer at a time over a UNet that every measured configuration shares.

The trainer is the engine's own (:func:`engine.train.segment.build_trainer`), fed by the
engine's :class:`engine.train.samples.SampleSource` and micro-batch stream: the bench
times the code that trains, not a copy of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from engine.model.loading import BaseModel
from engine.task.definition import TaskDefinition
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource
from engine.train.segment import Trainer, build_trainer
from engine.train.stream import batch_stream


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
        batches = batch_stream(source, plan, 0, steps, task.dataloader_num_workers)
        yield trainer, batches, source
    finally:
        reset_unet(base)


def reset_unet(base: BaseModel) -> None:
    """Undo what :func:`build_trainer` did to the shared UNet: adapter, levers, train mode."""
    unet = base.unet
    if getattr(unet, "peft_config", None):
        unet.unload_lora()
    if unet.is_gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    unet.to(memory_format=torch.contiguous_format)
    unet.eval().requires_grad_(False)
