"""The held-out validation loss: one number per checkpoint, the same for the same weights.

The training loss of a step depends on which samples, noise and timesteps it drew, so its
curve is noisy and two runs cannot be compared by it. This loss fixes everything but the
weights: the same examples (center-cropped, first caption, the VAE posterior's mean, no
flip or caption rule), the same noise (drawn from ``generator(seed, "validation_loss",
example, k)``) at the same :data:`LOSS_TIMESTEPS` evenly spaced timesteps, plain MSE
against the model's target (no min-SNR weighting, no subset loss weights). Recomputed for
the same checkpoint on the same kind of device it gives the same value; across steps and
across runs of the same base model and held-out set, only the adapter differs.

Loss masks: a training example whose subset has masks (``dataset.masks`` or
``mask_column``) weighs its error exactly as training does (:mod:`engine.train.loss_masks`):
its mask through the example's own center crop, box-averaged to latent size, floored at
the subset's ``mask_min_weight``, and the loss the mean of mask x error; so a masked run's
validation loss measures what its training loss learns from, not the background it
ignores, and a white mask gives the unmasked number bit for bit. A task without masks
computes exactly what it did before masks existed. The validation dataset file's images
have no masks: their loss is the plain mean.

The held-out set is the validation dataset file's images with their prompts when the file
has an ``image`` column (``source: "validation_dataset"``), else a fixed subset of the
training data, :data:`TRAINING_EXAMPLES` examples drawn by the task's seed
(``source: "training_subset"``: not held out from training, but the same every time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.data.images import ImageRejected, decode_image
from engine.data.transforms import CropPlan, apply_crop, plan_crop
from engine.infer.validation_set import ValidationItem, ValidationSetError
from engine.model.family import encode_captions, sdxl_time_ids, unet_extra_inputs
from engine.model.loading import BaseModel
from engine.model.precision import autocast
from engine.store import storage
from engine.task.definition import TaskDefinition
from engine.train.bucket_sides import vae_factor
from engine.train.loss import per_sample_loss, target_for
from engine.train.loss_masks import mask_weights, sample_mask
from engine.train.noising import NoiseTables
from engine.train.seeding import generator

#: Timesteps per example, evenly spaced over the scheduler's range (mid-points).
LOSS_TIMESTEPS = 4
#: Examples of the training data used when the validation set has no images.
TRAINING_EXAMPLES = 4
MAX_IMAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class HeldOutExample:
    """One example of the held-out set: pixels [3, H, W] in [-1, 1], its caption, and the
    SDXL micro-conditioning sizes of its crop."""

    pixels: torch.Tensor
    caption: str
    original_size: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]
    crop: CropPlan | None = None  # the crop that made ``pixels`` (its mask follows it)


@dataclass(frozen=True)
class HeldOutSet:
    source: str  # "validation_dataset" or "training_subset"
    examples: list[HeldOutExample]
    indexes: list[int]  # training-data indexes (training_subset) or validation rows
    #: the TrainingData the examples come from (training_subset): their loss masks
    data: Any = None

    def loss_weights(self, i: int, size: tuple[int, int], factor: int) -> torch.Tensor | None:
        """Example ``i``'s per-latent-pixel loss weights [1, 1, h, w] at latent ``size``,
        made by training's own functions (mask through the example's crop, unflipped;
        its subset's floor); None when no subset has masks (the plain mean, as before)."""
        data = self.data
        if data is None or not data.masked:
            return None
        from engine.train.samples import SampleDecisions

        example, index = self.examples[i], self.indexes[i]
        decision = SampleDecisions(example.caption, example.crop, flip=False)
        mask = sample_mask(data, index, decision, None, factor)
        return mask_weights(mask, data.subset_settings(index).mask_floor, size)[None]


def _example(image: Any, target: Any, caption: str) -> HeldOutExample:
    plan = plan_crop(image.size, target, center=True, generator=None)
    return HeldOutExample(apply_crop(image, plan, flip=False), caption, plan.original_size,
                          (plan.top, plan.left), plan)


def held_out_set(task: TaskDefinition, items: list[ValidationItem], dataset: Any) -> HeldOutSet:
    """The validation set's images (when it has any), else a fixed training subset."""
    from engine.data.buckets import Bucket

    rows = [(i, item) for i, item in enumerate(items) if item.image is not None]
    if rows:
        examples = []
        for i, item in rows:
            try:
                image = decode_image(storage.read_bytes(item.image, limit=MAX_IMAGE_BYTES))
            except FileNotFoundError:
                raise ValidationSetError(
                    f"validation.dataset_file row {i}: image {storage.redact(item.image)} "
                    "does not exist") from None
            except (ImageRejected, OSError, ValueError) as exc:
                raise ValidationSetError(
                    f"validation.dataset_file row {i}: image {storage.redact(item.image)} "
                    f"cannot be used: {exc}") from None
            examples.append(_example(image, Bucket(item.width, item.height), item.prompt))
        return HeldOutSet("validation_dataset", examples, [i for i, _ in rows])
    from engine.train.samples import training_data

    data = training_data(task, dataset)
    order = torch.randperm(len(data), generator=generator(task.seed, "validation_loss_examples"))
    picks = [int(i) for i in order[: min(TRAINING_EXAMPLES, len(data))]]
    examples = [_example(data.image(i), data.bucket(i), (data.captions(i) or [""])[0])
                for i in picks]
    return HeldOutSet("training_subset", examples, picks, data)


def loss_timesteps(num_train_timesteps: int, count: int = LOSS_TIMESTEPS) -> list[int]:
    """``count`` timesteps at the mid-points of equal parts of [0, num_train_timesteps)."""
    return [(2 * k + 1) * num_train_timesteps // (2 * count) for k in range(count)]


@torch.no_grad()
def validation_loss(base: BaseModel, prediction_type: str, held_out: HeldOutSet,
                    seed: int) -> dict[str, Any]:
    """The mean loss of the adapted ``base`` on ``held_out`` at fixed noise and timesteps.

    One example and timestep per UNet call (batch 1), so the value never depends on how
    the work is batched. Returns ``{"loss", "per_timestep"}`` (plain floats).
    """
    noising = NoiseTables(base.noise_scheduler)  # the training step's own noising
    timesteps = loss_timesteps(int(base.noise_scheduler.config.num_train_timesteps))
    device, scale, factor = base.device, base.vae_scaling_factor, vae_factor(base)
    sums = [0.0] * len(timesteps)
    for i, example in enumerate(held_out.examples):
        x = example.pixels[None].to(device, base.vae.dtype)
        latents = (base.vae.encode(x).latent_dist.mean.float() * scale).to(device)
        masks = held_out.loss_weights(i, tuple(latents.shape[-2:]), factor)
        masks = None if masks is None else masks.to(device)
        conditioning = encode_captions(base.family, base.tokenizers, base.text_encoders,
                                       [example.caption], device)
        time_ids = None
        if base.family.is_sdxl:
            h, w = example.pixels.shape[1:]
            time_ids = sdxl_time_ids([example.original_size], [example.crop_top_left],
                                     (h, w)).to(device)
        for k, step in enumerate(timesteps):
            noise = torch.randn(latents.shape, generator=generator(seed, "validation_loss", i, k))
            noise = noise.to(device)
            t = torch.tensor([step], device=device)
            noisy = noising.add_noise(latents, noise, t)
            with autocast(device, base.dtype):
                extra = unet_extra_inputs(base.family, conditioning, time_ids)
                prediction = base.unet(noisy, t, **extra).sample
            target = target_for(noising, prediction_type, latents, noise, t)
            sums[k] += float(per_sample_loss(prediction, target, None, masks)[0])
    n = max(len(held_out.examples), 1)
    per_timestep = [s / n for s in sums]
    return {"loss": sum(per_timestep) / len(per_timestep),
            "per_timestep": dict(zip(map(str, timesteps), per_timestep, strict=True))}
