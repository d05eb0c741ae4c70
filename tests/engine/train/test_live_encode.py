"""The live path's lean encoder calls give what the calls they replace give, bit for bit
(engine/train/live_encode.py)."""

from __future__ import annotations

import pytest
import torch

from engine.model.loading import load_base_model, training_device
from engine.train.live_encode import frozen, posterior
from engine.train.samples import encode_caption
from tests.support.engine import make_task


@pytest.fixture(scope="module")
def base():
    return load_base_model(make_task(), training_device())


def images(count: int) -> torch.Tensor:
    return torch.rand((count, 3, 64, 64), generator=torch.Generator().manual_seed(5)) * 2 - 1


@torch.no_grad()
@pytest.mark.parametrize("count", [1, 3])
def test_the_posterior_is_vae_encodes_latent_dist_bit_for_bit(base, count: int) -> None:
    x = images(count)
    dist = base.vae.encode(x).latent_dist
    mean, std = posterior(base.vae, x)
    assert torch.equal(mean, dist.mean) and torch.equal(std, dist.std)


@torch.no_grad()
def test_a_vae_that_tiles_or_slices_goes_through_its_own_encode(base) -> None:
    vae, x = base.vae, images(2)
    calls = []
    original = vae.encode
    vae.encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for switch in ("use_slicing", "use_tiling"):
            setattr(vae, switch, True)
            try:
                want = original(x).latent_dist
                got = posterior(vae, x)
            finally:
                setattr(vae, switch, False)
            assert torch.equal(got[0], want.mean) and torch.equal(got[1], want.std)
    finally:
        del vae.encode
    assert len(calls) == 2


def test_what_a_frozen_encoder_returns_trains_like_a_plain_tensor(base) -> None:
    with frozen():
        mean, std = posterior(base.vae, images(1))
        text = encode_caption(base, "a red square")["prompt_embeds"]
    weight = torch.nn.Parameter(torch.ones(()))
    latent = mean.float() + std.float() * torch.randn(mean.shape)  # as draw_latent does
    loss = (weight * latent).sum() + (weight * torch.stack([text])).sum()
    loss.backward()
    assert weight.grad is not None
    with torch.no_grad():
        plain = encode_caption(base, "a red square")["prompt_embeds"]
    assert torch.equal(text, plain)
