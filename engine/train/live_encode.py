"""The live path's encoders, with less around them: the same kernels, the same bits.

Why: with the cache off every sample goes through the VAE (and, with a frozen text
encoder, every new caption through it) one at a time (see :mod:`engine.train.samples`
for why not batched). On tiny-sd1 a step spends more time around these calls than in
them, so what is cut here is the wrapping, never the arithmetic:

- :func:`posterior` calls the VAE's ``encoder`` and ``quant_conv`` itself and computes
  the posterior's mean and std the way diffusers' ``DiagonalGaussianDistribution`` does
  (chunk, clamp the log-variance to [-30, 20], ``exp(0.5 * logvar)``), without the
  ``encode`` wrapper, the output object, and the variance nobody reads. A VAE of another
  kind, or one that tiles, goes through its own ``encode``.
- :func:`frozen` runs a frozen encoder under ``torch.inference_mode`` (no version
  counters, no autograd bookkeeping). What it returns is only read by later ops that make
  new tensors (stack, the posterior draw), never changed in place or saved for backward.

``tests/engine/train/test_live_encode.py`` checks each against the call it replaces, bit
for bit; the golden check and the cache == live tests check the whole path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: diffusers' DiagonalGaussianDistribution clamps the log-variance to this range
LOGVAR_RANGE = (-30.0, 20.0)


@contextmanager
def frozen() -> Iterator[None]:
    """Encoding with frozen weights: no autograd state at all."""
    with torch.inference_mode():
        yield


def _lean(vae: Any, x: torch.Tensor) -> bool:
    """Whether ``vae`` is an AutoencoderKL whose ``encode`` is encoder + quant_conv for
    ``x``: no tiling, no slicing of a batch, no accelerate offload hook (which ``encode``
    would run first). Anything else keeps its own ``encode``."""
    if type(vae).__name__ != "AutoencoderKL" or hasattr(vae, "_hf_hook"):
        return False
    return not (getattr(vae, "use_tiling", True) or (vae.use_slicing and x.shape[0] > 1))


def posterior(vae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of ``x`` [B, 3, H, W], as ``vae.encode(x)``'s
    ``latent_dist.mean`` and ``.std``."""
    if not _lean(vae, x):
        dist = vae.encode(x).latent_dist
        return dist.mean, dist.std
    moments = vae.encoder(x)
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = torch.clamp(logvar, *LOGVAR_RANGE)
    return mean, torch.exp(0.5 * logvar)
