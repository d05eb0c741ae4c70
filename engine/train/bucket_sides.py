"""Which bucket sides a model can train: multiples of its VAE factor x UNet downsampling.

A latent is the image divided by the VAE's factor (8 for SD), and the UNet halves it
once per down block but the last; a side that does not divide evenly gives a latent
whose shape the noise and the skip connections disagree on, which would fail at the
first step of a run. So every bucket is checked when training is set up, before the
cache is built or a step is taken, and refused with a message naming the bucket and
the model.

Without bucketing (one square bucket per subset, as before buckets existed) only the
VAE factor is required: diffusers' UNet pads a latent side it cannot halve evenly, and a
task that trained before must keep training (its square is never refused for the
UNet's sake).
"""

from __future__ import annotations

from typing import Any

from engine.data.buckets import Bucket
from engine.data.errors import DatasetError


class BucketSizeError(DatasetError):
    """A bucket (or square resolution) with a side the model cannot train at."""


def vae_factor(base: Any) -> int:
    """Pixels per latent cell: 2 ** (VAE blocks - 1); 8 when there is no VAE config."""
    if base.vae is None:
        return 8
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


def unet_factor(base: Any) -> int:
    """Latent cells per cell of the UNet's deepest level: 2 ** (down blocks - 1)."""
    return 2 ** (len(base.unet.config.down_block_types) - 1)


def check_bucket_sides(data: Any, base: Any, model_name: str) -> None:
    """Refuse any subset's bucket with a side the model needs to be a multiple of more.

    ``data`` is a :class:`engine.data.training_data.TrainingData`; every bucket of every
    subset's list is checked (not only those an image went to), so the answer does not
    depend on which images the dataset holds.
    """
    vae = vae_factor(base)
    full = vae * unet_factor(base)
    for k, settings in enumerate(data.settings):
        square = Bucket(settings.resolution, settings.resolution)
        bucketed = settings.buckets != (square,)
        need = full if bucketed else vae
        for bucket in settings.buckets:
            if bucket.width % need == 0 and bucket.height % need == 0:
                continue
            where = f"subset {k}" if len(data.settings) > 1 else "the dataset"
            if bucketed:
                raise BucketSizeError(
                    f"bucket {bucket} of {where} cannot be trained on {model_name}: its sides "
                    f"must be multiples of {need} (VAE factor {vae} x UNet downsampling "
                    f"{full // vae}); set buckets.step to a multiple of {need} or give sizes "
                    "that are"
                )
            raise BucketSizeError(
                f"resolution {settings.resolution} of {where} cannot be trained on "
                f"{model_name}: it must be a multiple of the VAE factor {vae}"
            )
