"""An exponential moving average of the trained weights, kept in every checkpoint.

The average is a second copy of the trainable weights, keyed like
:attr:`~engine.train.trainer.Trainer.params`. A checkpoint stores it as a LoRA file of its
own, :data:`EMA_FILE`, in the very layout of ``pytorch_lora_weights.safetensors`` (the
same writer is used, with the average swapped into the adapter for the moment of
writing), so publishing it is publishing that file, and restoring it reads it the way
the raw weights are read. Swaps are copies, which are exact: the raw weights come back
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from engine.lora.weights import LORA_FILE
from engine.store.commit import CheckpointError
from engine.task.definition import EmaArgs, TaskDefinition

EMA_FILE = "pytorch_lora_weights_ema.safetensors"

Params = Mapping[str, torch.nn.Parameter]


@dataclass
class Ema:
    """The average (``shadow``) and when it moves: see :class:`EmaArgs`."""

    decay: float
    start_step: int
    update_every: int
    shadow: dict[str, torch.Tensor]

    @classmethod
    def of(cls, args: EmaArgs, params: Params) -> Ema:
        """An average equal to ``params`` now (step 0)."""
        shadow = {name: p.detach().clone() for name, p in params.items()}
        return cls(args.decay, args.start_step, args.update_every, shadow)

    def due(self, step: int) -> bool:
        """Whether the average moves after global step ``step`` (past the start)."""
        return step > self.start_step and (step - self.start_step) % self.update_every == 0

    @torch.no_grad()
    def update(self, params: Params, step: int) -> None:
        """After global step ``step``: follow the weights up to the start, then average."""
        if step <= self.start_step:
            self.capture(params)
        elif self.due(step):
            for name, p in params.items():
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def capture(self, params: Params) -> None:
        """Set the average to ``params`` exactly."""
        for name, p in params.items():
            self.shadow[name].copy_(p.detach())

    @contextmanager
    def swapped_in(self, params: Params) -> Iterator[None]:
        """The average in ``params`` inside the block; the raw weights back after it."""
        with torch.no_grad():
            raw = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(raw[name])


def ema_of(task: TaskDefinition, params: Params) -> Ema | None:
    """The task's average over ``params`` at step 0, or None when it asks for none."""
    args = task.train_args.ema
    return Ema.of(args, params) if args is not None else None


def ema_files(ema: Ema | None, params: Params, lora_bytes: Callable[[], bytes]
              ) -> dict[str, bytes]:
    """``{EMA_FILE: the average as a LoRA file}`` ({} without an average).

    ``lora_bytes`` writes the adapter's current weights as the checkpoint's LoRA file.
    """
    if ema is None:
        return {}
    with ema.swapped_in(params):
        return {EMA_FILE: lora_bytes()}


def restore_ema(ema: Ema | None, params: Params, files: Mapping[str, bytes],
                load_lora: Callable[[bytes], None]) -> None:
    """Set the average from a checkpoint's :data:`EMA_FILE`; the raw weights stay.

    ``load_lora`` copies a LoRA file into the adapter (whose weights are ``params``).
    """
    if ema is None:
        return
    if EMA_FILE not in files:
        raise CheckpointError(f"the task keeps an EMA but the checkpoint has no {EMA_FILE}")
    with ema.swapped_in(params):
        load_lora(files[EMA_FILE])
        ema.capture(params)


def published_source(task: TaskDefinition) -> str:
    """The checkpoint file the main published weights come from: EMA or raw."""
    args = task.train_args.ema
    return EMA_FILE if args is not None and args.publish == "ema" else LORA_FILE


def other_source(task: TaskDefinition) -> tuple[str, str] | None:
    """(checkpoint file, file-name suffix) of the other weights when both are published."""
    args = task.train_args.ema
    if args is None or not args.publish_both:
        return None
    return (LORA_FILE, "_raw") if args.publish == "ema" else (EMA_FILE, "_ema")
