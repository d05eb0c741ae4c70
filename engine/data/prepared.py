"""Where a task's data and model identity come from when a segment runs on its own.

The Prefect flow prepares the dataset in its own step and hands the address on; a
standalone ``loraflow segment`` prepares it here, under a data root (default
``$LORAFLOW_HOME/datasets``), at an address derived from the dataset arguments, so the
second segment finds the first one's work and downloads nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from engine.data.buckets import Bucket
from engine.data.dataset import prepare_dataset
from engine.data.identity import default_dataset_address
from engine.data.layout import DatasetManifest, open_dataset
from engine.data.masks import check_mask_args
from engine.data.shard_index import open_shards
from engine.data.shards import prepare_shards
from engine.data.training_data import SubsetSettings, TrainingData
from engine.model.embedded.registry import is_embedded, loraflow_home, resolve_dataset
from engine.store import storage
from engine.task.definition import DatasetArgs, TaskDefinition


def resolved_dataset_args(args: DatasetArgs) -> DatasetArgs:
    """Embedded dataset ids (loraflow/demo-shapes) become the local folder they build."""
    if args.name is not None and is_embedded(args.name):
        return args.model_copy(update={"name": resolve_dataset(args.name)})
    return args


def default_data_root() -> str:
    return str(loraflow_home() / "datasets")


def default_cache_root() -> str:
    return str(loraflow_home() / "cache")


def subset_buckets(args: DatasetArgs, task: TaskDefinition) -> tuple[Bucket, ...] | None:
    """The bucket list a subset's records are assigned to; None when bucketing is off.

    On when the subset or ``train_args`` sets ``buckets``. Off, nothing is added to the
    records or the source identity, so a task without buckets keeps its prepared
    address and bytes.
    """
    if args.buckets is None and task.train_args.buckets is None:
        return None
    return SubsetSettings.of(args, task.train_args).buckets


def prepare_subsets(task: TaskDefinition, data_root: str | None,
                    progress: bool = False) -> list[DatasetManifest]:
    """Prepare (or find already prepared) each of the task's subsets; their manifests.

    With bucketing on, each record holds its bucket (``"bucket": [w, h]``).
    """
    root = data_root or default_data_root()
    out = []
    for subset in task.subsets:
        args = resolved_dataset_args(subset)
        check_mask_args(args)
        buckets = subset_buckets(subset, task)
        if args.shards:
            out.append(prepare_shards(args, subset_address(subset, task, root),
                                      progress=progress, buckets=buckets))
            continue
        keep = keeps_uncaptioned(task)
        out.append(prepare_dataset(args, subset_address(subset, task, root),
                                   progress=progress, buckets=buckets, keep_uncaptioned=keep))
    return out


def keeps_uncaptioned(task: TaskDefinition) -> bool:
    """Whether the task's images without a caption are kept (with an empty one, and a
    caption column added when the source has none) for the caption step to fill: a task
    with ``captioning``."""
    return task.captioning is not None


def subset_address(subset: DatasetArgs, task: TaskDefinition, root: str) -> str:
    """Where :func:`prepare_subsets` prepares ``subset`` of ``task`` under ``root``; the one
    formula, so the reference checks (``engine.task.references``) find that very copy."""
    args = resolved_dataset_args(subset)
    buckets = subset_buckets(subset, task)
    if args.shards:
        return default_dataset_address(args, root, buckets)
    return default_dataset_address(args, root, buckets, keeps_uncaptioned(task))


def prepare_for_task(task: TaskDefinition, data_root: str | None,
                     progress: bool = False) -> DatasetManifest:
    """The first subset's manifest (the only one of a one-source task)."""
    return prepare_subsets(task, data_root, progress)[0]


def load_dataset_for_task(task: TaskDefinition, data_root: str | None,
                          progress: bool = False) -> TrainingData:
    """Every subset prepared (and captioned, with ``captioning``) and opened, as the one
    collection training reads (the DreamBooth class subset last, made or found by
    :func:`class_manifests`)."""
    manifests, _ = caption_manifests(task, prepare_subsets(task, data_root, progress), data_root)
    return open_subsets(task, manifests + class_manifests(task, data_root))


def caption_root(data_root: str | None) -> str:
    """The caption cache: ``captions/`` in the data folder (``--data-dir``, default
    ``$LORAFLOW_HOME/datasets``; beside ``class-images/``), so machines sharing prepared
    data share answers too. Every entry point (the flow's caption step, ``loraflow
    caption``, ``loraflow segment``) finds it here and nowhere else: answers one paid for
    are never asked for again by another."""
    return storage.join(data_root or default_data_root(), "captions")


def caption_manifests(task: TaskDefinition, manifests: list[DatasetManifest],
                      data_root: str | None, progress: Any = None
                      ) -> tuple[list[DatasetManifest], Any]:
    """The subsets as training reads them once captioned (``captioning``): the caption
    step's datasets, found when it ran before (no backend asked), made when not, answers
    cached under :func:`caption_root`. Without ``captioning``, ``manifests`` as they are
    and None."""
    if task.captioning is None:
        return manifests, None
    from engine.caption.subsets import caption_subsets

    return caption_subsets(task, manifests, caption_root(data_root), progress=progress)


def class_manifests(task: TaskDefinition, data_root: str | None) -> list[DatasetManifest]:
    """The DreamBooth class subset's manifest (generated where missing), or none."""
    if task.dreambooth is None:
        return []
    from engine.infer.class_images import ensure_class_subset

    return [ensure_class_subset(task, data_root or default_data_root()).manifest]


def open_subsets(task: TaskDefinition, manifests: list[DatasetManifest]) -> TrainingData:
    """The prepared subsets (``manifests``, in the task's order) as one collection; a
    manifest past the task's subsets is the DreamBooth class subset's."""
    own, extra = manifests[:len(task.subsets)], manifests[len(task.subsets):]
    parts = [open_shards(m.address, a) if a.shards else open_dataset(m.address)
             for m, a in zip(own, task.subsets, strict=True)]
    settings = [SubsetSettings.of(args, task.train_args) for args in task.subsets]
    if extra:
        from engine.data.class_subset import class_subset_settings

        if len(extra) != 1 or task.dreambooth is None:
            raise ValueError("one manifest per subset (and one for the class subset)")
        parts.append(open_dataset(extra[0].address))
        settings.append(class_subset_settings(task))
    return TrainingData(parts, settings)


def model_identity(base: Any) -> str:
    """A hash of the loaded components' configs (and, for local folders, weight sizes).

    It joins name, revision and variant in the cache fingerprint so that a local folder
    whose weights were replaced under the same path does not reuse stale latents.
    """
    parts: dict[str, Any] = {
        "unet": _portable(dict(base.unet.config)),
        "vae": _portable(dict(base.vae.config)) if base.vae is not None else None,
        "text": [_portable(enc.config.to_dict()) for enc in base.text_encoders],
    }
    root = Path(base.location)
    if root.is_dir():
        parts["files"] = sorted(
            (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*.safetensors")
        )
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """A component config without where it was loaded from (``_name_or_path``).

    That path is the machine's (a Hub snapshot under its HF_HOME, ``$LORAFLOW_HOME``):
    with it, workers sharing one cache on S3 would each build their own.
    """
    return {k: v for k, v in config.items() if k != "_name_or_path"}


def ensure_cache_for_task(task: TaskDefinition, data_root: str | None, cache_root: str) -> dict:
    """Build (or find) the caption/latent cache of a task's data; the flow's cache step.

    Loads only what encodes (VAE, text encoders), not the optimizer or adapter. Returns
    ``{"address": url or None, "built_now": bool}``: small, for Prefect to pass along.
    """
    from engine.model.loading import load_base_model, training_device
    from engine.train.cache import ensure_cache

    dataset = load_dataset_for_task(task, data_root)
    base = load_base_model(task, training_device())
    cache = ensure_cache(task, base, dataset, cache_root, model_identity(base))
    if cache is None:
        return {"address": None, "built_now": False}
    return {"address": cache.address, "built_now": cache.built_now}
