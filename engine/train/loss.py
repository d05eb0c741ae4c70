"""The diffusion training loss, per sample, with optional min-SNR weighting."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.train.noising import NoiseTables


def snr(noise_scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) expressed for the model's target.

    The paper weights the x0-error by min(SNR, gamma). An epsilon-prediction error is the
    x0-error times SNR, so its weight is min(SNR, gamma) / SNR; a v-prediction error is the
    x0-error times (SNR + 1), so its weight is min(SNR, gamma) / (SNR + 1).
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped / snr_values


def target_for(noising: NoiseTables, prediction_type: str, latents: torch.Tensor,
               noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noising.velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of each sample (fp32), optionally weighted.

    ``masks`` (loss masks, [B, 1, h, w], :mod:`engine.train.loss_masks`) weight each
    latent pixel's error, and the sample's loss is the MEAN over all its pixels of
    mask * error (kohya's choice), not divided by the mask's sum: so a white mask is
    bit for bit no mask, a pixel weighs the same in every image (a small subject adds
    less than a large one, as its pixels are fewer), and an all-black mask gives a
    zero loss, not 0 / 0. None keeps the plain mean.
    """
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if masks is not None:
        loss = loss * masks
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    return loss if weights is None else loss * weights


def loss_weights(noise_scheduler: Any, timesteps: torch.Tensor, snr_gamma: float | None,
                 prediction_type: str) -> torch.Tensor | None:
    """Per-sample weights: min-SNR-gamma when ``snr_gamma`` is set, else None (plain MSE)."""
    if snr_gamma is None:
        return None
    return min_snr_weights(snr(noise_scheduler, timesteps), snr_gamma, prediction_type)
