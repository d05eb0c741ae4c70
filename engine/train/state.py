"""Optimizer, learning-rate schedule and counters: saved and restored exactly.

Everything is stored as safetensors (tensors) or JSON (numbers), never pickle, so a
checkpoint from an untrusted worker cannot run code when it is read. Optimizer moments
are keyed by LoRA parameter *name*, not position, so a reader notices a changed adapter.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from engine.errors import LoraflowError
from engine.store.safetensors_io import dump
from engine.task.definition import TaskDefinition

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"


class StateMismatchError(LoraflowError):
    """A checkpoint's training state does not fit this task."""


def training_identity(task: TaskDefinition, dataset_hash: str,
                      subset_hashes: list[str] | None = None) -> dict[str, Any]:
    """The parts of a task that decide the training's result.

    Per-segment settings (steps or epochs of this segment, budget, checkpoint, workers,
    validation, output formats, cache mode) are left out: they may differ between
    segments without changing the result.

    The data: a one-source task keeps its ``"dataset"`` entry (its arguments and the
    prepared dataset's ``dataset_hash``), so its checkpoints still match; a task with
    ``datasets`` has ``"datasets"``, each subset's arguments with its own content hash
    (``subset_hashes``, :attr:`~engine.data.training_data.TrainingData.subset_hashes`),
    so a checkpoint names which subset differs.
    """
    per_segment = {"num_train_steps", "num_train_epochs", "segment_budget_seconds", "cache",
                   "checkpointing_steps", "checkpoints_total_limit", "gradient_checkpointing",
                   "digest_steps"}
    ta = {k: v for k, v in task.train_args.stable_dump().items() if k not in per_segment}
    if isinstance(ta.get("ema"), dict):  # which weights get published is not training
        ta["ema"] = {k: v for k, v in ta["ema"].items() if k not in ("publish", "publish_both")}
    identity = {
        "model": task.model.stable_dump(),
        **_data_identity(task, dataset_hash, subset_hashes),
        "train_args": ta,
        "lora": {**{k: v for k, v in task.lora.stable_dump().items() if k != "alpha"},
                 "alpha": task.lora_alpha},
        "transforms": task.transforms.model_dump(),
        "mixed_precision": task.mixed_precision,
        "seed": task.seed,
    }
    if task.training_type != "lora":  # a LoRA task keeps the identity it always had
        identity["training_type"] = task.training_type
        identity["full_finetune"] = task.full_finetune.model_dump()
    if task.dreambooth is not None:  # the class subset: its weight and images (hash last)
        identity["dreambooth"] = {"prior_loss_weight": task.dreambooth.prior_loss_weight,
                                  "class_images": (subset_hashes or [dataset_hash])[-1]}
    return json.loads(json.dumps(identity))  # as a checkpoint holds it: tuples are lists


def _data_identity(task: TaskDefinition, dataset_hash: str,
                   subset_hashes: list[str] | None) -> dict[str, Any]:
    if task.datasets is None:
        return {"dataset": {**task.subsets[0].stable_dump(), "content_hash": dataset_hash}}
    classes = int(task.dreambooth is not None)  # the class subset's hash comes last
    if subset_hashes is None or len(subset_hashes) != len(task.datasets) + classes:
        raise ValueError("a task with datasets needs one content hash per subset")
    own = zip(task.datasets, subset_hashes[:len(task.datasets)], strict=True)
    return {"datasets": [{**args.stable_dump(), "content_hash": digest} for args, digest in own]}


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def identity_differences(saved: dict[str, Any], current: dict[str, Any],
                         path: str = "") -> list[str]:
    """JSON pointers where two identities differ, for an error a person can act on."""
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        where = f"{path}/{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, where)
        elif _dict_lists(a, b):  # subsets: say which one differs, and where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                out += identity_differences(x, y, f"{where}/{i}")
        elif a != b:
            out.append(f"{where}: checkpoint has {json.dumps(a)}, task has {json.dumps(b)}")
    return out


def _dict_lists(a: Any, b: Any) -> bool:
    return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
            and all(isinstance(v, dict) for v in [*a, *b]))


# -- optimizer -------------------------------------------------------------------------


def optimizer_files(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[bytes, dict]:
    """(safetensors bytes of the moments, JSON-able param groups).

    Per-weight values that are not tensors (a Python ``step`` count: Prodigy, Adafactor,
    bitsandbytes) go to the JSON as ``scalars`` with their own type, so they come back as
    the same int or float, not as a tensor the optimizer would compute with differently.
    Floats kept in param groups (Prodigy's step-size estimate, schedule-free's weight sum
    and mode) are JSON numbers, which read back to the very same float.
    """
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in _flat(per_param).items():
            if isinstance(value, (bool, int, float)) or value is None:
                scalars.setdefault(names[index], {})[key] = value
                continue
            tensors[f"{names[index]}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [
        {**{k: v for k, v in g.items() if k != "params"},
         "param_names": [names[i] for i in g["params"]]}
        for g in state["param_groups"]
    ]
    saved: dict[str, Any] = {"param_groups": groups, "param_names": names}
    if scalars:  # only then: AdamW's state (all tensors) keeps its bytes
        saved["scalars"] = scalars
    return dump(tensors), saved


def _flat(per_param: dict[str, Any]) -> dict[str, Any]:
    """One weight's state with nested dicts merged in: bitsandbytes wraps its quantization
    state in one (for FSDP) and reads it back either way."""
    flat: dict[str, Any] = {}
    for key, value in per_param.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def restore_optimizer(
    optimizer: torch.optim.Optimizer, names: list[str], data: bytes, saved: dict
) -> None:
    if saved["param_names"] != names:
        raise StateMismatchError(
            "optimizer state in the checkpoint belongs to a different set of LoRA weights"
        )
    tensors = load_tensors(data)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.split("::")
        state.setdefault(names.index(name), {})[field] = value
    for name, values in saved.get("scalars", {}).items():
        state.setdefault(names.index(name), {}).update(values)
    groups = [
        {**{k: v for k, v in g.items() if k != "param_names"},
         "params": [names.index(n) for n in g["param_names"]]}
        for g in saved["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- learning-rate schedule and grad scaler ----------------------------------------------


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def restore_scheduler(scheduler: Any, saved: dict[str, Any]) -> None:
    scheduler.load_state_dict({**scheduler.state_dict(), **saved})
