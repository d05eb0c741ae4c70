"""The forward diffusion of a micro-batch, and the velocity target, from tables made once.

Why: diffusers' ``DDPMScheduler.add_noise`` and ``get_velocity`` rebuild each sample's
coefficients on every call: two gathers, two powers, a subtraction and six reshapes, 16
small kernel calls for a multiply-add, each slow right after the UNet's backward has
pushed the step's code out of the CPU's caches. The coefficients only depend on the
timestep, so both square roots are taken once for the whole schedule here, and a step
gathers its samples' pairs in one call.

Same bits: ``alphas_cumprod ** 0.5`` and ``(1 - alphas_cumprod) ** 0.5`` are elementwise
(an element's square root is the same in a table as after a gather), and the noisy
sample is then ``a * x + b * noise`` as diffusers computes it, in its dtype
(``tests/engine/train/test_noising.py`` compares both with the scheduler's own).
"""

from __future__ import annotations

from typing import Any

import torch


class NoiseTables:
    """Per-timestep (sqrt(alpha_bar), sqrt(1 - alpha_bar)) of a DDPM scheduler, per dtype
    and device as the latents need them."""

    def __init__(self, scheduler: Any) -> None:
        self._alphas_cumprod = scheduler.alphas_cumprod
        self._tables: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def coefficients(self, timesteps: torch.Tensor, like: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) of each sample, shaped to broadcast
        over ``like`` ([B, 1, 1, 1] for latents)."""
        key = (like.dtype, like.device)
        table = self._tables.get(key)
        if table is None:  # diffusers' order: to the samples' device, then their dtype
            alphas = self._alphas_cumprod.to(device=like.device).to(dtype=like.dtype)
            table = self._tables[key] = torch.stack([alphas ** 0.5, (1 - alphas) ** 0.5], 1)
        pairs = table[timesteps.to(like.device)]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return pairs[:, 0].view(shape), pairs[:, 1].view(shape)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """``scheduler.add_noise(latents, noise, timesteps)``, bit for bit."""
        signal, sigma = self.coefficients(timesteps, latents)
        return signal * latents + sigma * noise

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
        """``scheduler.get_velocity(latents, noise, timesteps)``, bit for bit."""
        signal, sigma = self.coefficients(timesteps, latents)
        return signal * noise - sigma * latents
