"""What differs when every UNet weight trains (``training_type: "full"``), not a LoRA.

Three things, and nothing else: which parameters train (all of the UNet's, and all of
the text encoders' with ``full_finetune.train_text_encoder``, kept in fp32 whatever
``mixed_precision`` says, so the frozen-weight dtype only sets the autocast), what a
checkpoint holds instead of the LoRA file (``trained_weights.safetensors``: exactly the
trained weights, by the trainer's parameter names, beside the optimizer moments that
:mod:`engine.train.state` already keys by name), and restoring that file bit for bit.
The loop, the schedule, the data stream and the commit protocol are the LoRA ones.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as load_tensors

from engine.errors import LoraflowError
from engine.store.safetensors_io import dump
from engine.task.definition import TaskDefinition

WEIGHTS_FILE = "trained_weights.safetensors"
_FORMAT = {"format": "pt", "loraflow_kind": "full_finetune"}


class TrainedWeightsError(LoraflowError):
    """A checkpoint's trained weights do not fit the model they should restore."""


def is_full(task: TaskDefinition) -> bool:
    return task.training_type == "full"


def trainable_modules(base: Any, task: TaskDefinition) -> dict[str, Any]:
    """{prefix: module} of what trains: ``unet`` and, when asked, ``text_encoder[_2]``."""
    modules = {"unet": base.unet}
    if task.full_finetune.train_text_encoder:
        for i, encoder in enumerate(base.text_encoders):
            modules["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
    for module in modules.values():
        module.float()  # trained weights in fp32, as LoRA weights are
        module.requires_grad_(True)
    return modules


def full_parameters(module: Any) -> dict[str, torch.nn.Parameter]:
    """Every parameter of ``module`` by name, sorted (the optimizer's stable order)."""
    return dict(sorted(module.named_parameters()))


def text_encoder_learning_rate(task: TaskDefinition) -> float | None:
    """The text encoders' own learning rate, if the task gives one (LoRA or full)."""
    if is_full(task):
        return task.full_finetune.text_encoder_learning_rate
    te = task.lora.text_encoder
    return te.learning_rate if te is not None else None


def weights_file_bytes(params: dict[str, torch.nn.Parameter]) -> bytes:
    """The trained weights as safetensors, keyed like the optimizer state (``unet.<name>``)."""
    return dump({name: p.detach().cpu().contiguous() for name, p in params.items()}, _FORMAT)


def restore_weights(data: bytes, params: dict[str, torch.nn.Parameter]) -> None:
    """Copy a checkpoint's trained weights into ``params``; refuse any that do not fit."""
    tensors = load_tensors(data)
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise TrainedWeightsError(
            f"the checkpoint's {WEIGHTS_FILE} is for another model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name]
            if value.shape != param.shape or value.dtype != param.dtype:
                raise TrainedWeightsError(
                    f"{WEIGHTS_FILE}: {name} is {tuple(value.shape)} {value.dtype}, the model "
                    f"has {tuple(param.shape)} {param.dtype}"
                )
            param.copy_(value)


def state_dicts(data: bytes) -> dict[str, dict[str, torch.Tensor]]:
    """The trained weights file split per module: {"unet": {name: tensor}, ...}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_tensors(data).items():
        prefix, _, name = key.partition(".")
        out.setdefault(prefix, {})[name] = value
    return out
