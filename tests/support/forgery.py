"""Cheating workers, for the verifier's tests: checkpoints rewritten so that every check a
reader can make without replaying still passes (file hashes, manifest checksum, the
trail's hash of the final state), as a dishonest node would write them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from engine.data.prepared import load_dataset_for_task
from engine.model.loading import load_base_model, training_device
from engine.store.commit import commit_checkpoint, read_checkpoint
from engine.task.definition import TaskDefinition
from engine.train.digests import TRAIL_KEY, state_point
from engine.train.plan import TrainingPlan
from engine.train.resume import restore
from engine.train.saver import INTERMEDIATE_DIR
from engine.train.state import STATE_FILE, fingerprint, training_identity
from engine.train.trainer import build_trainer


def copy_segment(segment_dir: str | Path, to: Path) -> Path:
    """A copy of a segment folder to forge, leaving the honest one as it is."""
    shutil.copytree(segment_dir, to)
    return to


def recommit(checkpoint: str | Path, *, files: dict[str, bytes] | None = None,
             state: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
             drop: tuple[str, ...] = ()) -> None:
    """Commit ``checkpoint`` again with files, training-state keys and manifest meta
    replaced (``drop``: meta keys removed): a consistent forgery, every sha256 and the
    manifest checksum recomputed."""
    loaded = read_checkpoint(str(checkpoint))
    new_files = {**loaded.files, **(files or {})}
    if state:
        document = json.loads(new_files[STATE_FILE]) | state
        new_files[STATE_FILE] = json.dumps(document, indent=2, sort_keys=True).encode()
    kept = {k: v for k, v in loaded.manifest.meta.items() if k not in drop}
    commit_checkpoint(str(checkpoint), new_files, meta={**kept, **(meta or {})})


def nudged_lora(data: bytes) -> bytes:
    """The LoRA file with its first weight moved by one ulp (torch.nextafter)."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    tensors = load(data)
    name = sorted(tensors)[0]
    flat = tensors[name].reshape(-1).clone()
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))
    tensors[name] = flat.reshape(tensors[name].shape)
    return save(tensors, metadata=header.get("__metadata__"))


def state_digests(task: TaskDefinition, checkpoint: str | Path) -> dict[str, Any]:
    """The trail point a checkpoint's state hashes to (what a forger writes last)."""
    dataset = load_dataset_for_task(task, None)
    tr = build_trainer(task, load_base_model(task, training_device()),
                       TrainingPlan.for_task(task, dataset))
    restore(tr, read_checkpoint(str(checkpoint)))
    return state_point(tr, None).to_json()


def with_last_point(meta: dict[str, Any], point: dict[str, Any],
                    loss: str | None) -> dict[str, Any]:
    """``meta``'s trail with its last point replaced by ``point`` (and ``loss``)."""
    trail = json.loads(json.dumps(meta[TRAIL_KEY]))
    trail["points"][-1] = {**point, "step": trail["end"], "loss": loss}
    return {TRAIL_KEY: trail}


def relabel(segment_dir: Path, task: TaskDefinition) -> None:
    """Every checkpoint of a segment folder marked as trained for ``task`` (another seed's
    work passed off as this task's): identity and fingerprints rewritten."""
    dataset = load_dataset_for_task(task, None)
    identity = training_identity(task, dataset.content_hash, dataset.subset_hashes)
    stamp = fingerprint(identity)
    folders = [segment_dir / "checkpoint", *sorted((segment_dir / INTERMEDIATE_DIR).iterdir())]
    for folder in folders:
        recommit(folder, state={"identity": identity, "task_fingerprint": stamp},
                 meta={"task_fingerprint": stamp})
