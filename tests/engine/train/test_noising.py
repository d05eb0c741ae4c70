"""Noising from tables made once gives diffusers' DDPM scheduler its very bits, for every
timestep, in each dtype training uses (engine/train/noising.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from engine.train.noising import NoiseTables


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tables_give_the_schedulers_noisy_latents_and_velocity_bit_for_bit(
    schedule: str, dtype: torch.dtype,
) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)
    tables = NoiseTables(scheduler)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 7, 8, 16):  # vector bodies and scalar tails
        latents = (torch.randn((batch, 4, 9, 7), generator=g) * 3).to(dtype)
        noise = torch.randn((batch, 4, 9, 7), generator=g).to(dtype)
        for timesteps in (torch.randint(0, 1000, (batch,), generator=g),
                          torch.tensor([0, 999] * batch)[:batch]):
            assert torch.equal(tables.add_noise(latents, noise, timesteps),
                               scheduler.add_noise(latents, noise, timesteps))
            assert torch.equal(tables.velocity(latents, noise, timesteps),
                               scheduler.get_velocity(latents, noise, timesteps))


def test_every_timestep_gets_the_schedulers_coefficients() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    timesteps = torch.arange(1000)
    latents, zeros = torch.ones((1000, 1, 1, 1)), torch.zeros((1000, 1, 1, 1))
    tables = NoiseTables(scheduler)
    assert torch.equal(tables.add_noise(latents, zeros, timesteps),
                       scheduler.add_noise(latents, zeros, timesteps))  # sqrt(alpha_bar)
    assert torch.equal(tables.add_noise(zeros, latents, timesteps),
                       scheduler.add_noise(zeros, latents, timesteps))  # sqrt(1 - alpha_bar)
