"""What one training sample becomes before the UNet sees it.

For each use of an example (epoch, index, draw) the random decisions are drawn from that
sample's own generators: which caption (under its subset's caption rules), where to
crop its bucket, whether to flip, the VAE posterior sample, the noise (at the bucket's
latent shape) and the timestep. The image and caption are then encoded
either live (VAE + text encoder, one sample at a time) or looked up in the cache, which
was filled by the very same per-sample encoding functions: so both paths give the same
bits.

Why one sample at a time: on CPU a batch goes through other convolution and matmul
kernels than a single sample (measured on tiny-sd1: VAE posterior means differ by up to
2e-6, text embeddings by 6e-8), so batched encoding would make a sample's latent depend
on its batch mates, and the live path would stop matching the cache. Where it was proven
equal to the bit (CPU, fp32, one thread), a micro-batch's images still go through one
VAE call that replays one image's kernel choices, and its new captions through one
text-encoder call (engine/train/batched_encode.py). The live path is
made cheap otherwise: the VAE's device and dtype are read once (diffusers walks every
module to answer them), and a caption that occurs twice in a micro-batch is encoded once.

Random crop with ``train_args.cached_crops`` = K: each example has K crop positions of
its own, drawn once from ``generator(seed, "crop_candidates", index)`` (the same in
every epoch and segment); each use picks one of them with its ``"crop"`` generator. So
their latents can be cached (K per orientation) and a run from the cache equals the same
task with the cache off, bit for bit. It is a different augmentation from live random
crop, which draws a fresh position for every use: K positions per image, not all.

The dataset is an :class:`engine.data.training_data.TrainingData`: each example's bucket,
resolution, caption rules and loss weight are its subset's. A micro-batch holds one
bucket (the plan groups samples so); SDXL's time ids of each sample are its image's true
(height, width), its crop's (top, left) as the model sees it, and the bucket's
(height, width).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from engine.data.buckets import Bucket
from engine.data.training_data import SubsetSettings, TrainingData
from engine.data.transforms import CropPlan, plan_crop
from engine.model.family import encode_captions, sdxl_time_ids
from engine.model.precision import autocast
from engine.task.definition import CaptionArgs, TaskDefinition
from engine.train.batched_encode import CaptionBatcher, VaeBatcher
from engine.train.bucket_sides import check_bucket_sides, vae_factor
from engine.train.caption_rules import caption_for
from engine.train.live_encode import frozen, posterior
from engine.train.loss_masks import batch_weights, sample_mask
from engine.train.plan import SampleRef
from engine.train.resized_images import ResizedImages
from engine.train.seeding import generator
from engine.train.transfer import to_device


@dataclass(frozen=True)
class SampleSettings:
    """The part of a task that decides what a sample becomes (the sample components' own
    arguments: a seed, a size, the augmentations, the noise offset)."""

    seed: int
    resolution: int
    center_crop: bool
    random_flip: bool
    noise_offset: float
    trains_text: bool  # a text-encoder LoRA learns: captions are encoded with gradients
    #: random crop among this many fixed positions per example (cacheable); None: live
    cached_crops: int | None = None

    @classmethod
    def for_task(cls, task: TaskDefinition) -> SampleSettings:
        ta = task.train_args
        return cls(
            seed=task.seed, resolution=ta.resolution, center_crop=task.transforms.center_crop,
            random_flip=task.transforms.random_flip, noise_offset=ta.noise_offset,
            trains_text=task.trains_text_encoder,
            cached_crops=None if task.transforms.center_crop else ta.cached_crops,
        )


@dataclass(frozen=True)
class SampleDecisions:
    caption: str
    crop: CropPlan
    flip: bool
    #: which of the example's cached crop positions (``cached_crops``); None otherwise
    crop_choice: int | None = None


def decide(captions: list[str], image_size: tuple[int, int], ref: SampleRef,
           settings: SampleSettings, bucket: Bucket | None = None,
           rules: CaptionArgs | None = None) -> SampleDecisions:
    """The random choices for one use of one example (independent of batch and segment).

    ``bucket`` is the crop's size (default: the square of ``settings.resolution``),
    ``rules`` the subset's caption rules (default: none, one caption picked).
    """
    seed = settings.seed
    caption = caption_for(captions, rules or CaptionArgs(), seed, ref.epoch, ref.key)
    target = bucket or settings.resolution
    choice = None
    if settings.center_crop:  # nothing is drawn: no generator to build
        crop = plan_crop(image_size, target, center=True, generator=None)
    elif settings.cached_crops:
        crop_generator = generator(seed, "crop", ref.epoch, ref.key)
        choice = int(torch.randint(0, settings.cached_crops, (1,), generator=crop_generator))
        crop = crop_candidates(image_size, target, settings.cached_crops, seed, ref.index)[choice]
    else:
        crop = plan_crop(image_size, target, center=False,
                         generator=generator(seed, "crop", ref.epoch, ref.key))
    flip = False
    if settings.random_flip:
        flip = bool(torch.rand(1, generator=generator(seed, "flip", ref.epoch, ref.key)) < 0.5)
    return SampleDecisions(caption, crop, flip, choice)


def crop_candidates(image_size: tuple[int, int], target: int | Bucket, count: int, seed: int,
                    index: int) -> list[CropPlan]:
    """The ``count`` crop positions example ``index`` may train with under
    ``cached_crops``: drawn once per example, so the cache can hold their latents."""
    g = generator(seed, "crop_candidates", index)
    return [plan_crop(image_size, target, center=False, generator=g) for _ in range(count)]


def crop_top_left(decision: SampleDecisions) -> tuple[int, int]:
    """The crop's top-left corner in the image as the model sees it (after any flip)."""
    plan = decision.crop
    left = plan.left
    if decision.flip:
        left = plan.resized_size[1] - plan.left - plan.crop_size[1]
    return (plan.top, left)


def training_data(task: TaskDefinition, dataset: Any) -> TrainingData:
    """``dataset`` as a TrainingData: as is, or (a single prepared or synthetic dataset,
    as the bench passes) wrapped as the task's one subset."""
    if isinstance(dataset, TrainingData):
        return dataset
    return TrainingData([dataset], [SubsetSettings.of(task.subsets[0], task.train_args)])


# -- encoders (shared by live training and the cache) ----------------------------------


def placement(vae: Any) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of ``vae``. Read it once: diffusers' ``ModelMixin.device`` and
    ``.dtype`` walk every module on each access (~1 ms each on tiny-sd1)."""
    return vae.device, vae.dtype


@torch.no_grad()
def encode_image(vae: Any, pixels: torch.Tensor,
                 where: tuple[torch.device, torch.dtype] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of one image [3, H, W], on CPU in the VAE's dtype.

    One image at a time, so the result never depends on what else is in a batch.
    ``where`` is :func:`placement` of ``vae``, read once by a caller that encodes many.
    """
    device, dtype = where or placement(vae)
    mean, std = posterior(vae, pixels[None].to(device, dtype))  # = vae.encode's latent_dist
    return mean[0].cpu(), std[0].cpu()


@torch.no_grad()
def encode_caption(base: Any, caption: str) -> dict[str, torch.Tensor]:
    """Text conditioning of one caption, on CPU, without the batch dimension."""
    out = encode_captions(base.family, base.tokenizers, base.text_encoders, [caption], base.device)
    return {k: v[0].cpu() for k, v in out.items()}


# -- batches --------------------------------------------------------------------------


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    time_ids: torch.Tensor | None
    #: each sample's subset loss_weight; None when every subset's is 1.0 (old tasks)
    sample_weights: torch.Tensor | None = None
    #: per-latent-pixel loss weights [B, 1, h, w] from loss masks; None: no subset has masks
    masks: torch.Tensor | None = None


def latent_eps(shape: torch.Size, seed: int, ref: SampleRef) -> torch.Tensor:
    """The standard-normal draw that picks a sample's latent from its posterior."""
    return torch.randn(shape, generator=generator(seed, "latent", ref.epoch, ref.key))


def draw_latent(mean: torch.Tensor, std: torch.Tensor, seed: int, ref: SampleRef) -> torch.Tensor:
    return mean.float() + std.float() * latent_eps(mean.shape, seed, ref)


def draw_latents(means: list[torch.Tensor], stds: list[torch.Tensor], seed: int,
                 refs: list[SampleRef], scale: float) -> torch.Tensor:
    """:func:`draw_latent` of each sample times ``scale``, stacked: the draws one per sample
    (their own generators), the arithmetic once on the stacked batch. Every element goes
    through the same elementwise ops as alone, so the bits are those of stacking the
    per-sample latents, in 4 calls instead of 4 per sample."""
    eps = torch.stack([latent_eps(m.shape, seed, r) for m, r in zip(means, refs, strict=True)])
    return (torch.stack(means).float() + torch.stack(stds).float() * eps) * scale


def draw_noise(shape: torch.Size, seed: int, ref: SampleRef, num_timesteps: int,
               offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion noise (plus ``offset`` times a per-channel draw) and the timestep of one
    sample, from the sample's own generators."""
    g = generator(seed, "noise", ref.epoch, ref.key)
    noise = torch.randn(shape, generator=g)
    if offset:
        noise = noise + offset * torch.randn((shape[0], 1, 1), generator=g)
    timestep_generator = generator(seed, "timestep", ref.epoch, ref.key)
    t = torch.randint(0, num_timesteps, (1,), generator=timestep_generator)
    return noise, t


@dataclass
class PreparedSample:
    """A sample's CPU-side inputs; made in data-loader workers when there are any."""

    ref: SampleRef
    decision: SampleDecisions
    noise: torch.Tensor
    timestep: torch.Tensor
    pixels: torch.Tensor | None  # None when the latent posterior comes from the cache
    posterior: tuple[torch.Tensor, torch.Tensor] | None
    conditioning: dict[str, torch.Tensor] | None  # None when encoded live
    mask: torch.Tensor | None = None  # latent-size loss mask [1, h, w]; None: none


class SampleSource:
    """Turns sample refs into batches: CPU work in :meth:`prepare`, encoding in :meth:`batch`.

    :meth:`prepare` is what a data-loader worker runs (decisions, crops, cache lookups,
    noise); :meth:`batch` runs in the main process, encodes whatever the cache did not
    have on the training device, and stacks the batch. Buckets the model cannot train
    at are refused here, before any step.
    """

    def __init__(self, task: TaskDefinition, dataset: Any, base: Any, cache: Any | None) -> None:
        self.settings = SampleSettings.for_task(task)
        self.dataset = training_data(task, dataset)
        self.base, self.cache = base, cache
        check_bucket_sides(self.dataset, base, task.model.name)
        self.num_timesteps = int(base.noise_scheduler.config.num_train_timesteps)
        self.channels = int(base.unet.config.in_channels)
        self.factor = vae_factor(base)
        weights = [s.loss_weight for s in self.dataset.settings]
        self.weighted = any(w != 1.0 for w in weights)
        self._resized = ResizedImages()  # each image decoded once per process (bounded)

    @cached_property
    def needs_encoders(self) -> bool:
        """Whether :meth:`batch` runs the VAE or a text encoder: for what the cache lacks,
        or because a text encoder trains. The stream makes batches ahead only when not
        (``engine/train/stream.py``): an encode made ahead is time a stop may waste."""
        cache, trains_text = self.cache, self.settings.trains_text
        return trains_text or cache is None or not (cache.has_latents and cache.has_text)

    @cached_property
    def _vae_placement(self) -> tuple[torch.device, torch.dtype]:
        return placement(self.base.vae)

    @cached_property
    def _vae_batcher(self) -> VaeBatcher:  # a micro-batch's images in one call, same bits
        return VaeBatcher(self.base.vae)

    @cached_property
    def _caption_batcher(self) -> CaptionBatcher:  # and its new captions
        return CaptionBatcher(self.base)

    def latent_shape(self, bucket: Bucket) -> torch.Size:
        """(channels, height, width) of the latent of an image cropped to ``bucket``."""
        return torch.Size((self.channels, bucket.height // self.factor,
                           bucket.width // self.factor))

    def prepare(self, refs: list[SampleRef]) -> list[PreparedSample]:
        return [self._prepare_one(r) for r in refs]

    def _prepare_one(self, ref: SampleRef) -> PreparedSample:
        s, data, i = self.settings, self.dataset, ref.index
        bucket = data.bucket(i)
        rules = data.subset_settings(i).captions
        d = decide(data.captions(i), data.size(i), ref, s, bucket, rules)
        shape = self.latent_shape(bucket)
        noise, t = draw_noise(shape, s.seed, ref, self.num_timesteps, s.noise_offset)
        cache = self.cache
        cached = cache is not None
        posterior = (cache.latent(i, d.flip, d.crop_choice) if cached and cache.has_latents
                     else None)
        pixels = None
        if posterior is None:
            pixels = self._resized.pixels(data, i, d.crop, d.flip)  # = apply_crop's
        cond = cache.text(d.caption) if cached and cache.has_text else None
        if s.trains_text:
            cond = None  # encoded with gradients in the main process
        mask = sample_mask(data, i, d, cache, self.factor) if data.masked else None
        return PreparedSample(ref, d, noise, t, pixels, posterior, cond, mask)

    def batch(self, samples: list[PreparedSample]) -> Batch:
        base, seed, trains_text = self.base, self.settings.seed, self.settings.trains_text
        bucket = _one_bucket(samples)
        means, stds, conds = [], [], []
        encoded: dict[str, dict[str, torch.Tensor]] = {}  # each caption once per batch
        with frozen():  # one call for what the cache lacked (engine/train/batched_encode.py)
            fresh = iter(self._vae_batcher.encode(
                [s.pixels for s in samples if s.posterior is None], self._vae_placement))
            new = list(dict.fromkeys(s.decision.caption for s in samples
                                     if s.conditioning is None))
            if not trains_text and len(new) > 1 and self._caption_batcher.usable:
                encoded = self._caption_batcher.encode(new)
        for s in samples:
            if s.posterior is not None:
                mean, std = s.posterior
            else:  # the draw below makes a plain tensor of it
                mean, std = next(fresh)
            means.append(mean)
            stds.append(std)
            if trains_text:
                continue
            if s.conditioning is not None:
                conds.append(s.conditioning)
                continue
            caption = s.decision.caption
            if caption not in encoded:
                with frozen():  # stacked below into a plain tensor
                    encoded[caption] = encode_caption(base, caption)
            conds.append(encoded[caption])
        time_ids = None
        if base.family.is_sdxl:
            time_ids = sdxl_time_ids(
                [s.decision.crop.original_size for s in samples],
                [crop_top_left(s.decision) for s in samples],
                (bucket.height, bucket.width),
            ).to(base.device)
        device = base.device
        if trains_text:  # the text-encoder LoRA learns: encode with gradients
            with autocast(base.device, base.dtype):
                conditioning = encode_captions(base.family, base.tokenizers, base.text_encoders,
                                               [s.decision.caption for s in samples], device)
        else:
            conditioning = {k: to_device(torch.stack([c[k] for c in conds]), device)
                            for k in conds[0]}
        weights = None
        if self.weighted:
            weights = torch.tensor(
                [self.dataset.subset_settings(s.ref.index).loss_weight for s in samples],
                dtype=torch.float32,
            ).to(device)
        return Batch(
            latents=to_device(draw_latents(means, stds, seed, [s.ref for s in samples],
                                           base.vae_scaling_factor), device),
            noise=to_device(torch.stack([s.noise for s in samples]), device),
            timesteps=to_device(torch.cat([s.timestep for s in samples]), device),
            conditioning=conditioning,
            time_ids=time_ids,
            sample_weights=weights,
            masks=(to_device(batch_weights(samples, self.dataset), device)
                   if self.dataset.masked else None),
        )


def _one_bucket(samples: list[PreparedSample]) -> Bucket:
    """The bucket every sample of a micro-batch shares (the plan's guarantee)."""
    buckets = {s.decision.crop.bucket for s in samples}
    if len(buckets) != 1:
        refs = [(s.ref.index, str(s.decision.crop.bucket)) for s in samples]
        raise AssertionError(
            f"a micro-batch must hold one bucket, this one mixes {len(buckets)}: "
            f"(example, bucket) = {refs}; the training plan groups samples by bucket"
        )
    (bucket,) = buckets
    assert bucket is not None
    return bucket
