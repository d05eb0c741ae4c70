"""The caption / latent cache: encode a dataset once, train from it many times.

A cache lives at ``<cache root>/<fingerprint>/`` on any fsspec storage and is a committed
folder of kind ``loraflow-cache/1`` (engine.store.commit: data files first, manifest last;
the manifest's meta holds the fingerprint). Caches written before that kind existed were
committed as checkpoints with a made-up ``global_step``; they are refused as another kind
and rebuilt once, into the same bytes. The fingerprint covers everything
that changes its content: model (name, revision, variant, component configs), precision,
resolution, crop and flip mode, and the prepared dataset's content hash. So a later
segment, or a later run on the same data and model, finds it and encodes nothing. When a
subset sets its own resolution, buckets or caption rules (or train_args.buckets is
set), each subset's resolution, bucket list and caption rules are in it too; a task
that uses none of these keeps the fingerprint (and the bytes) it always had.

What is cached:
- text: the conditioning (both encoders and the pooled embedding for SDXL) of every
  caption a sample can train with, each once, exactly as the trainer would compute it:
  every variant of every example's captions under its subset's caption rules
  (:func:`engine.train.caption_rules.caption_variants`: prefix and suffix applied, and
  the empty caption when there is dropout). When any subset shuffles tags the text is
  NOT cached (the orders are too many to list): captions are encoded live each step,
  and a log line says so. Latents are still cached.
- latents: the VAE posterior (mean, std) of each image at its bucket's size (center
  crop), for both orientations when random_flip is on. With random crop, only when
  ``train_args.cached_crops`` = K is set: then the posterior of each of the image's K
  crop positions (:func:`engine.train.samples.crop_candidates`, drawn once per image,
  per bucket), each orientation. Plain random crop differs every use, so its latents
  are encoded live each step (the text stays cached). The posterior sample itself is
  drawn at training time from the sample's own generator, so training from the cache
  gives the same bits as encoding every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from engine.data.buckets import Bucket
from engine.data.mask_transforms import crop_mask
from engine.data.training_data import SubsetSettings
from engine.data.transforms import apply_crop, plan_crop
from engine.model.components import override_settings
from engine.store import storage
from engine.store.commit import (
    CommitError,
    FolderKind,
    NotCommittedError,
    commit_folder,
    read_folder,
)
from engine.store.safetensors_io import dump
from engine.task.definition import CaptionArgs, TaskDefinition
from engine.train.bucket_sides import check_bucket_sides, vae_factor
from engine.train.caption_rules import caption_variants
from engine.train.samples import (
    crop_candidates,
    encode_caption,
    encode_image,
    placement,
    training_data,
)

log = logging.getLogger(__name__)

CACHE_FORMAT = "loraflow-cache/1"
#: The committed-folder kind of a cache: its manifest format and the meta it carries.
CACHE = FolderKind(CACHE_FORMAT, "cache", {"fingerprint": str})


def caches_latents(task: TaskDefinition) -> bool:
    """Latents can be cached only when the crops are known before training: the center
    crop, or the fixed positions of ``cached_crops``."""
    fixed = task.transforms.center_crop or task.train_args.cached_crops is not None
    return task.train_args.cache == "auto" and fixed and not streams(task)


def caches_text(task: TaskDefinition) -> bool:
    """Caption embeddings are fixed only while the text encoders are frozen, and listable
    only while no subset shuffles tags."""
    return (task.train_args.cache == "auto" and not task.trains_text_encoder
            and not shuffles_tags(task) and not streams(task))


def streams(task: TaskDefinition) -> bool:
    """A subset of webdataset shards is streamed, never cached whole (it may not fit)."""
    return any(s.shards for s in task.subsets)


def shuffles_tags(task: TaskDefinition) -> bool:
    return any(s.captions.shuffle_tags for s in task.subsets)


def _subset_keys(task: TaskDefinition) -> list[dict[str, Any]] | None:
    """Each subset's resolution, buckets and caption rules; None when every subset trains
    as before they existed (one square of train_args.resolution, default captions), so
    such a task keeps its fingerprint."""
    ta = task.train_args
    settings = [SubsetSettings.of(args, ta) for args in task.subsets]
    square = (Bucket(ta.resolution, ta.resolution),)
    if ta.buckets is None and all(
        s.resolution == ta.resolution and s.buckets == square and s.captions == CaptionArgs()
        for s in settings
    ):
        return None
    return [
        {"resolution": s.resolution, "buckets": [list(b) for b in s.buckets],
         "captions": s.captions.model_dump(mode="json")}
        for s in settings
    ]


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
    subsets = _subset_keys(task)
    if subsets is not None:
        key["subsets"] = subsets
    components = override_settings(task.model)
    if components:  # other text encoders / VAE / dtypes encode other latents and embeddings
        key["components"] = components
    if ta.cached_crops is not None:  # absent otherwise: older tasks keep their fingerprint
        key["cached_crops"] = ta.cached_crops
        key["seed"] = task.seed  # the crop positions are drawn from it
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
    _grouped_texts: tuple[dict, dict] | None = field(default=None, repr=False, compare=False)

    def latent(self, index: int, flip: bool,
               crop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of image ``index`` (``crop``: which of its cached crop positions)."""
        key = latent_key(index, flip, crop)
        return self.latents[f"{key}.mean"], self.latents[f"{key}.std"]

    def mask(self, index: int, flip: bool, crop: int | None = None) -> torch.Tensor | None:
        """The latent-size loss mask stored beside that latent; None when it has none."""
        return self.latents.get(f"{latent_key(index, flip, crop)}.mask")

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        found = self._texts_by_caption().get(caption_key(caption))
        if not found:
            raise KeyError(f"caption {caption[:60]!r} is not in the cache at {self.address}; "
                           "the cache holds every caption variant, so this is a bug")
        return dict(found)

    def _texts_by_caption(self) -> dict[str, dict[str, torch.Tensor]]:
        """``texts`` grouped by caption key, built once per ``texts`` dict: a lookup that
        scanned every key cost O(captions) per sample (milliseconds a step on a dataset
        of thousands)."""
        kept = self._grouped_texts
        if kept is not None and kept[0] is self.texts:
            return kept[1]
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.texts.items():
            key, _, field_name = name.partition(".")
            grouped.setdefault(key, {})[field_name] = tensor
        self._grouped_texts = (self.texts, grouped)
        return grouped


def latent_key(index: int, flip: bool, crop: int | None = None) -> str:
    """``<index>.<flip>`` for the center crop (the keys caches always had), else
    ``<index>.c<crop>.<flip>``."""
    return f"{index}.{int(flip)}" if crop is None else f"{index}.c{crop}.{int(flip)}"


def _tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return dump(tensors)


def build_cache_files(
    task: TaskDefinition, base: Any, dataset: Any, progress: Any = None
) -> dict[str, bytes]:
    """Encode every image at its bucket (each orientation used) and every caption variant."""
    data = training_data(task, dataset)
    files: dict[str, bytes] = {}
    if caches_latents(task):
        flips = (False, True) if task.transforms.random_flip else (False,)
        count = None if task.transforms.center_crop else task.train_args.cached_crops
        where = placement(base.vae)
        latents: dict[str, torch.Tensor] = {}
        for i in range(len(data)):
            if count is None:
                crops: list[tuple[int | None, Any]] = [
                    (None, plan_crop(data.size(i), data.bucket(i), center=True, generator=None))
                ]
            else:
                candidates = crop_candidates(data.size(i), data.bucket(i), count, task.seed, i)
                crops = list(enumerate(candidates))
            image, mask = data.image(i), data.mask(i)
            for choice, crop in crops:
                for flip in flips:
                    mean, std = encode_image(base.vae, apply_crop(image, crop, flip=flip), where)
                    key = latent_key(i, flip, choice)
                    latents[f"{key}.mean"], latents[f"{key}.std"] = mean, std
                    if mask is not None:  # loss masks: the same crop, at latent size
                        latents[f"{key}.mask"] = crop_mask(mask, crop, flip=flip,
                                                           factor=vae_factor(base))
            if progress:
                progress(i + 1, len(data))
        files["latents.safetensors"] = _tensors_bytes(latents)
    if caches_text(task):
        texts: dict[str, torch.Tensor] = {}
        captions: set[str] = set()
        for i in range(len(data)):
            variants = caption_variants(data.captions(i), data.subset_settings(i).captions)
            assert variants is not None, "caches_text is False when tags are shuffled"
            captions.update(variants)
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
    """Find the committed cache for this task and data, or build and commit it.

    Buckets the model cannot train at are refused first, before anything is encoded.
    """
    check_bucket_sides(training_data(task, dataset), base, task.model.name)
    if shuffles_tags(task) and task.train_args.cache == "auto":
        log.info("a subset shuffles caption tags: captions are encoded live every step, "
                 "not cached")
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

