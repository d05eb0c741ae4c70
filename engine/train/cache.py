"""The caption / latent cache: encode a dataset once, train from it many times.

A cache lives at ``<cache root>/<fingerprint>/`` on any fsspec storage and is a committed
folder of kind ``loraflow-cache/1`` (engine.store.commit: data files first, manifest last;
the manifest's meta holds the fingerprint). Caches written before that kind existed were
committed as checkpoints with a made-up ``global_step``; they are refused as another kind
and rebuilt once, into the same bytes. The fingerprint covers everything
that changes its content: model (name, revision, variant, component configs), precision,
resolution, crop and flip mode, and the prepared dataset's content hash. So a later
segment, or a later run on the same data and model, finds it and encodes nothing.

What is cached:
- text: each distinct caption's conditioning (both encoders and the pooled embedding for
  SDXL), exactly as the trainer would compute it.
- latents: the VAE posterior (mean, std) of each image, for both orientations when
  random_flip is on. Only with center crop: a random crop differs every epoch, so with
  random crop the latents are encoded live each step (the text stays cached). The
  posterior sample itself is drawn at training time from the sample's own generator,
  so training from the cache gives the same bits as encoding every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from engine.data.transforms import apply_crop, plan_crop
from engine.store import storage
from engine.store.commit import (
    CommitError,
    FolderKind,
    NotCommittedError,
    commit_folder,
    read_folder,
)
from engine.store.safetensors_io import dump
from engine.task.definition import TaskDefinition
from engine.train.samples import encode_caption, encode_image

log = logging.getLogger(__name__)

CACHE_FORMAT = "loraflow-cache/1"
#: The committed-folder kind of a cache: its manifest format and the meta it carries.
CACHE = FolderKind(CACHE_FORMAT, "cache", {"fingerprint": str})


def caches_latents(task: TaskDefinition) -> bool:
    """Latents can be cached only when the crop is the same every epoch."""
    return task.train_args.cache == "auto" and task.transforms.center_crop


def caches_text(task: TaskDefinition) -> bool:
    """Caption embeddings are fixed only while the text encoders are frozen."""
    return task.train_args.cache == "auto" and task.lora.text_encoder is None


def cache_fingerprint(task: TaskDefinition, model_identity: str, dataset_hash: str) -> str:
    """Hash of everything that changes what the cache holds."""
    ta = task.train_args
    key = {
        "format": CACHE_FORMAT,
        "model": [task.model.name, task.model.revision, task.model.variant, task.model.vae,
                  model_identity],
        "precision": task.mixed_precision,
        "text": caches_text(task),
        "latents": caches_latents(task),
        "resolution": ta.resolution,
        "center_crop": task.transforms.center_crop,
        "random_flip": task.transforms.random_flip,
        "dataset": dataset_hash,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()[:24]


@dataclass
class Cache:
    """A loaded cache: lookups by (image index, flip) and by caption text."""

    address: str
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: dict[str, torch.Tensor] = field(default_factory=dict)
    has_latents: bool = False
    has_text: bool = False
    built_now: bool = False  # True when this call encoded the data (for tests and logs)

    def latent(self, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[f"{index}.{int(flip)}.mean"], self.latents[f"{index}.{int(flip)}.std"]

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        prefix = caption_key(caption) + "."
        return {k[len(prefix) :]: v for k, v in self.texts.items() if k.startswith(prefix)}


def _tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return dump(tensors)


def build_cache_files(
    task: TaskDefinition, base: Any, dataset: Any, progress: Any = None
) -> dict[str, bytes]:
    """Encode every image (each orientation used) and every distinct caption."""
    files: dict[str, bytes] = {}
    if caches_latents(task):
        flips = (False, True) if task.transforms.random_flip else (False,)
        latents: dict[str, torch.Tensor] = {}
        for i in range(len(dataset)):
            size = task.train_args.resolution
            crop = plan_crop(dataset.size(i), size, center=True, generator=None)
            image = dataset.image(i)
            for flip in flips:
                mean, std = encode_image(base.vae, apply_crop(image, crop, flip=flip))
                latents[f"{i}.{int(flip)}.mean"], latents[f"{i}.{int(flip)}.std"] = mean, std
            if progress:
                progress(i + 1, len(dataset))
        files["latents.safetensors"] = _tensors_bytes(latents)
    if caches_text(task):
        texts: dict[str, torch.Tensor] = {}
        captions = {c for i in range(len(dataset)) for c in (dataset.captions(i) or [""])}
        for caption in sorted(captions):
            for name, tensor in encode_caption(base, caption).items():
                texts[f"{caption_key(caption)}.{name}"] = tensor
        files["text.safetensors"] = _tensors_bytes(texts)
    return files


def open_cache(address: str, fingerprint: str) -> Cache | None:
    """The committed cache at ``address``, or None when there is none (or it is damaged)."""
    try:
        loaded = read_folder(address, kind=CACHE)
    except NotCommittedError:
        return None
    except CommitError as exc:
        log.warning("cache at %s is unusable, rebuilding: %s", address, exc)
        return None
    if loaded.meta["fingerprint"] != fingerprint:
        log.warning("cache at %s was built for fingerprint %s, not %s; rebuilding",
                    address, loaded.meta["fingerprint"], fingerprint)
        return None
    cache = Cache(address)
    if "latents.safetensors" in loaded.files:
        cache.latents, cache.has_latents = load_tensors(loaded.files["latents.safetensors"]), True
    if "text.safetensors" in loaded.files:
        cache.texts, cache.has_text = load_tensors(loaded.files["text.safetensors"]), True
    return cache


def ensure_cache(
    task: TaskDefinition, base: Any, dataset: Any, root: str, model_identity: str,
    progress: Any = None,
) -> Cache | None:
    """Find the committed cache for this task and data, or build and commit it."""
    if not (caches_latents(task) or caches_text(task)):
        return None
    fingerprint = cache_fingerprint(task, model_identity, dataset.content_hash)
    address = storage.join(root, fingerprint)
    cache = open_cache(address, fingerprint)
    if cache is not None:
        log.info("using cache %s", address)
        return cache
    log.info("building cache %s (%d images)", address, len(dataset))
    files = build_cache_files(task, base, dataset, progress)
    commit_folder(address, files, {"fingerprint": fingerprint}, kind=CACHE)
    cache = open_cache(address, fingerprint)
    assert cache is not None, "a cache just committed must read back"
    cache.built_now = True
    return cache

