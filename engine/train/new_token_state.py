"""New tokens' embeddings in training: their optimizer groups and their checkpoint files.

The rows (:func:`engine.model.new_tokens.add_new_tokens`) are trainer parameters like the
LoRA's, named ``new_tokens.<token>.<encoder>``, so the optimizer moments, the gradient
clipping and the EMA cover them by name with nothing else to do. Their values are not in
the LoRA file (diffusers would refuse unknown keys there): they go to a file of their
own, :data:`NEW_TOKENS_FILE` (and the average's, :data:`NEW_TOKENS_EMA_FILE`), a few
kilobytes, restored bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from engine.model.new_tokens import add_new_tokens, token_rows
from engine.store.commit import CheckpointError
from engine.store.safetensors_io import dump
from engine.task.definition import TaskDefinition
from engine.train.ema import EMA_FILE, Ema, published_source

NEW_TOKENS_FILE = "new_token_embeddings.safetensors"
NEW_TOKENS_EMA_FILE = "new_token_embeddings_ema.safetensors"


def new_token_groups(task: TaskDefinition, base: Any, scale: float
                     ) -> tuple[list[dict[str, Any]], dict[str, torch.nn.Parameter]]:
    """The tokens added to ``base`` and one optimizer group per token, at its own
    learning rate (``learning_rate`` of the token, else train_args'), times ``scale``."""
    params = add_new_tokens(task, base)
    groups = []
    for spec in task.lora.new_tokens:
        mine = [p for k, p in params.items() if k.startswith(f"new_tokens.{spec.token}.")]
        lr = spec.learning_rate or task.train_args.learning_rate
        groups.append({"params": mine, "lr": lr * scale})
    return groups, params


def new_token_files(params: Mapping[str, torch.nn.Parameter], ema: Ema | None
                    ) -> dict[str, bytes]:
    """The checkpoint files of the rows (and of their average): {} without new tokens."""
    rows = token_rows(dict(params))
    if not rows:
        return {}
    files = {NEW_TOKENS_FILE: dump({k: p.detach().cpu().contiguous() for k, p in rows.items()})}
    if ema is not None:
        files[NEW_TOKENS_EMA_FILE] = dump({k: ema.shadow[k].detach().cpu().contiguous()
                                           for k in rows})
    return files


def restore_new_tokens(params: Mapping[str, torch.nn.Parameter], ema: Ema | None,
                       files: Mapping[str, bytes]) -> None:
    """Set the rows (and their average) from a checkpoint's files, exactly."""
    rows = token_rows(dict(params))
    if not rows:
        return
    targets = [(NEW_TOKENS_FILE, rows)]
    if ema is not None:
        targets.append((NEW_TOKENS_EMA_FILE, {k: ema.shadow[k] for k in rows}))
    with torch.no_grad():
        for name, into in targets:
            if name not in files:
                raise CheckpointError(f"the task trains new tokens but the checkpoint has no "
                                      f"{name}")
            saved = load_tensors(files[name])
            if set(saved) != set(into):
                raise CheckpointError(
                    f"{name} holds {sorted(saved)}, the task trains {sorted(into)}: were "
                    "lora.new_tokens changed?")
            for key, target in into.items():
                if saved[key].shape != target.shape:
                    raise CheckpointError(f"{name}: {key} has shape {tuple(saved[key].shape)}, "
                                          f"the task's is {tuple(target.shape)}")
                target.copy_(saved[key].to(target.device, target.dtype))


def published_token_file(task: TaskDefinition) -> str:
    """The checkpoint file the published embeddings come from: the EMA's or the raw."""
    return NEW_TOKENS_EMA_FILE if published_source(task) == EMA_FILE else NEW_TOKENS_FILE
