"""Each sample's loss mask, and a micro-batch's per-latent-pixel loss weights.

A sample's mask is its example's mask (:mod:`engine.data.masks`) through the sample's
own crop and flip, at latent size (:func:`engine.data.mask_transforms.crop_mask`). It
comes from the cache exactly when the sample's latent does (the cache stored it for
every crop and orientation it stored a latent for, with the same function), so training
from the cache gives the same bits as training live.

The loss weight of a latent pixel is ``floor + (1 - floor) * mask``, ``floor`` being the
subset's ``mask_min_weight`` (0: a black pixel teaches nothing). An example of a subset
without masks weighs 1 everywhere. How the weights enter the loss:
:func:`engine.train.loss.per_sample_loss`.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.data.mask_transforms import crop_mask


def sample_mask(data: Any, index: int, decision: Any, cache: Any | None,
                factor: int) -> torch.Tensor | None:
    """The latent-size mask [1, h, w] of one sample of example ``index`` (None: it has
    none). ``decision`` is the sample's :class:`~engine.train.samples.SampleDecisions`."""
    if cache is not None and cache.has_latents:
        return cache.mask(index, decision.flip, decision.crop_choice)
    mask = data.mask(index)
    if mask is None:
        return None
    return crop_mask(mask, decision.crop, flip=decision.flip, factor=factor)


def mask_weights(mask: torch.Tensor | None, floor: float | None,
                 size: tuple[int, ...]) -> torch.Tensor:
    """Loss weights [1, h, w] of one sample: from its latent-size ``mask`` and its subset's
    ``mask_min_weight`` (``floor``), or 1 everywhere at latent ``size`` (h, w) without a
    mask. Training (:func:`batch_weights`) and the validation loss both weigh so."""
    if mask is None:
        return torch.ones((1, *size), dtype=torch.float32)
    return mask if not floor else floor + (1.0 - floor) * mask


def batch_weights(samples: list[Any], data: Any) -> torch.Tensor:
    """Loss weights [B, 1, h, w] of a micro-batch's samples (each with ``mask``, ``noise``
    and ``ref``), from their masks and their subsets' ``mask_min_weight``."""
    return torch.stack([
        mask_weights(s.mask, data.subset_settings(s.ref.index).mask_floor, s.noise.shape[1:])
        for s in samples
    ])
