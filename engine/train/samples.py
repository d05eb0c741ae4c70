"""What one training sample becomes before the UNet sees it.

For each use of an example (epoch, index) the random decisions are drawn from that
sample's own generators: which caption, where to crop, whether to flip, the VAE
posterior sample, the noise and the timestep. The image and caption are then encoded
either live (VAE + text encoder, one sample at a time) or looked up in the cache, which
was filled by the very same per-sample encoding functions: so both paths give the same
bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.data.transforms import CropPlan, apply_crop, plan_crop
from engine.model.family import encode_captions, sdxl_time_ids
from engine.model.precision import autocast
from engine.task.definition import TaskDefinition
from engine.train.plan import SampleRef
from engine.train.seeding import generator


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

    @classmethod
    def for_task(cls, task: TaskDefinition) -> SampleSettings:
        ta = task.train_args
        return cls(
            seed=task.seed, resolution=ta.resolution, center_crop=task.transforms.center_crop,
            random_flip=task.transforms.random_flip, noise_offset=ta.noise_offset,
            trains_text=task.lora.text_encoder is not None,
        )


@dataclass(frozen=True)
class SampleDecisions:
    caption: str
    crop: CropPlan
    flip: bool


def decide(captions: list[str], image_size: tuple[int, int], ref: SampleRef,
           settings: SampleSettings) -> SampleDecisions:
    """The random choices for one use of one example (independent of batch and segment)."""
    seed = settings.seed
    captions = captions or [""]
    pick = 0
    if len(captions) > 1:
        g = generator(seed, "caption", ref.epoch, ref.key)
        pick = int(torch.randint(len(captions), (1,), generator=g))
    crop = plan_crop(
        image_size,
        settings.resolution,
        center=settings.center_crop,
        generator=generator(seed, "crop", ref.epoch, ref.key),
    )
    flip = False
    if settings.random_flip:
        flip = bool(torch.rand(1, generator=generator(seed, "flip", ref.epoch, ref.key)) < 0.5)
    return SampleDecisions(captions[pick], crop, flip)


def crop_top_left(decision: SampleDecisions) -> tuple[int, int]:
    """The crop's top-left corner in the image as the model sees it (after any flip)."""
    plan = decision.crop
    left = plan.left
    if decision.flip:
        left = plan.resized_size[1] - plan.left - plan.resolution
    return (plan.top, left)


# -- encoders (shared by live training and the cache) ----------------------------------


@torch.no_grad()
def encode_image(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of one image [3, H, W], on CPU in the VAE's dtype.

    One image at a time, so the result never depends on what else is in a batch.
    """
    x = pixels[None].to(vae.device, vae.dtype)
    dist = vae.encode(x).latent_dist
    return dist.mean[0].cpu(), dist.std[0].cpu()


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


def draw_latent(mean: torch.Tensor, std: torch.Tensor, seed: int, ref: SampleRef) -> torch.Tensor:
    eps = torch.randn(mean.shape, generator=generator(seed, "latent", ref.epoch, ref.key))
    return mean.float() + std.float() * eps


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


class SampleSource:
    """Turns sample refs into batches: CPU work in :meth:`prepare`, encoding in :meth:`batch`.

    :meth:`prepare` is what a data-loader worker runs (decisions, crops, cache lookups,
    noise); :meth:`batch` runs in the main process, encodes whatever the cache did not
    have on the training device, and stacks the batch.
    """

    def __init__(self, task: TaskDefinition, dataset: Any, base: Any, cache: Any | None) -> None:
        self.settings = SampleSettings.for_task(task)
        self.dataset, self.base, self.cache = dataset, base, cache
        self.num_timesteps = int(base.noise_scheduler.config.num_train_timesteps)
        self.latent_shape = _latent_shape(base, self.settings.resolution)

    def prepare(self, refs: list[SampleRef]) -> list[PreparedSample]:
        return [self._prepare_one(r) for r in refs]

    def _prepare_one(self, ref: SampleRef) -> PreparedSample:
        s = self.settings
        d = decide(self.dataset.captions(ref.index), self.dataset.size(ref.index), ref, s)
        noise, t = draw_noise(self.latent_shape, s.seed, ref, self.num_timesteps, s.noise_offset)
        cache = self.cache
        cached = cache is not None
        posterior = cache.latent(ref.index, d.flip) if cached and cache.has_latents else None
        pixels = None
        if posterior is None:
            pixels = apply_crop(self.dataset.image(ref.index), d.crop, flip=d.flip)
        cond = cache.text(d.caption) if cached and cache.has_text else None
        if s.trains_text:
            cond = None  # encoded with gradients in the main process
        return PreparedSample(ref, d, noise, t, pixels, posterior, cond)

    def batch(self, samples: list[PreparedSample]) -> Batch:
        base, seed, trains_text = self.base, self.settings.seed, self.settings.trains_text
        latents, conds = [], []
        for s in samples:
            mean, std = s.posterior if s.posterior is not None else encode_image(base.vae, s.pixels)
            latents.append(draw_latent(mean, std, seed, s.ref) * base.vae_scaling_factor)
            if not trains_text:
                conds.append(s.conditioning if s.conditioning is not None
                             else encode_caption(base, s.decision.caption))
        time_ids = None
        if base.family.is_sdxl:
            res = self.settings.resolution
            time_ids = sdxl_time_ids(
                [s.decision.crop.original_size for s in samples],
                [crop_top_left(s.decision) for s in samples],
                (res, res),
            ).to(base.device)
        device = base.device
        if trains_text:  # the text-encoder LoRA learns: encode with gradients
            with autocast(base.device, base.dtype):
                conditioning = encode_captions(base.family, base.tokenizers, base.text_encoders,
                                               [s.decision.caption for s in samples], device)
        else:
            conditioning = {k: torch.stack([c[k] for c in conds]).to(device) for k in conds[0]}
        return Batch(
            latents=torch.stack(latents).to(device),
            noise=torch.stack([s.noise for s in samples]).to(device),
            timesteps=torch.cat([s.timestep for s in samples]).to(device),
            conditioning=conditioning,
            time_ids=time_ids,
        )


def _latent_shape(base: Any, resolution: int) -> torch.Size:
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1) if base.vae is not None else 8
    channels = int(base.unet.config.in_channels)
    return torch.Size((channels, resolution // factor, resolution // factor))
