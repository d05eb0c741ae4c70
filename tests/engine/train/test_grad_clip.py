"""Clipping skips the multiply by exactly 1.0 and otherwise is torch's own, bit for bit
(engine/train/grad_clip.py)."""

from __future__ import annotations

import pytest
import torch

from engine.train.grad_clip import clip_gradients, total_norm

SHAPES = [(4, 320), (320, 4), (8,), (4, 64)] * 8


def weights_with_grads(scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    for k, w in enumerate(weights):
        if k != 5:  # one weight without a gradient, as a frozen or unused one
            w.grad = torch.randn(w.shape, generator=g) * scale
    return weights


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.05, 1.0, 30.0])
@pytest.mark.parametrize("max_norm", [1.0, 0.5])
def test_clipping_gives_torchs_norm_and_gradients_bit_for_bit(scale: float,
                                                              max_norm: float) -> None:
    expected, ours = weights_with_grads(scale), weights_with_grads(scale)
    norm = torch.nn.utils.clip_grad_norm_(expected, max_norm)
    assert torch.equal(clip_gradients(ours, max_norm), norm)
    for a, b in zip(expected, ours, strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_gradients_below_the_norm_are_left_as_they_are() -> None:
    weights = weights_with_grads(1e-4)
    before = [w.grad for w in weights]
    clip_gradients(weights, 1.0)
    assert [w.grad for w in weights] == before  # the same tensors, untouched


def test_a_nan_gradient_still_goes_through_torchs_multiply() -> None:
    expected, ours = weights_with_grads(1e-4), weights_with_grads(1e-4)
    for ws in (expected, ours):
        ws[0].grad[0, 0] = float("nan")
    norm = torch.nn.utils.clip_grad_norm_(expected, 1.0)
    assert norm.isnan() and clip_gradients(ours, 1.0).isnan()
    for a, b in zip(expected, ours, strict=True):
        if a.grad is not None:
            assert torch.equal(a.grad.isnan(), b.grad.isnan())
            assert torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num())


@pytest.mark.parametrize("offset", [-3e-6, -1e-6, -6e-7, -1e-7, 0.0, 1e-7, 1e-6])
def test_a_norm_within_a_millionth_of_max_norm_is_clipped_as_torch_does(offset: float) -> None:
    expected, ours = weights_with_grads(1.0), weights_with_grads(1.0)
    norm = float(torch.nn.utils.get_total_norm([w.grad for w in expected if w.grad is not None]))
    max_norm = norm / (1 + offset)  # the norm sits that far from max_norm (relative)
    clipped = torch.nn.utils.clip_grad_norm_(expected, max_norm)
    assert torch.equal(clip_gradients(ours, max_norm), clipped)
    for a, b in zip(expected, ours, strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_no_gradients_gives_a_zero_norm() -> None:
    assert float(clip_gradients([torch.nn.Parameter(torch.ones(3))], 1.0)) == 0.0


#: a LoRA's mix: many weights per size, sizes from 1 to above torch's parallel grain
NORM_SHAPES = [(4, 32), (32, 4), (4, 64), (64, 4), (1,), (3, 7), (4, 320), (320, 4),
               (40_000,), (8, 1280)] * 4


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_the_size_at_a_time_norm_is_torchs_total_norm_bit_for_bit(seed: int,
                                                                  threads: int) -> None:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g) * 10.0 ** int(torch.randint(-8, 4, (1,), generator=g))
             for s in NORM_SHAPES]
    grads[3].zero_()  # a weight whose gradient is exactly zero
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(total_norm(grads), torch.nn.utils.get_total_norm(grads, 2.0))
    finally:
        torch.set_num_threads(before)


def test_other_gradients_take_torchs_own_norm() -> None:
    conv = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)  # not contiguous
    mixed = [torch.randn(8), torch.randn(8, dtype=torch.float64)]
    for grads in ([conv, torch.randn(5)], mixed, []):
        assert torch.equal(total_norm(grads), torch.nn.utils.get_total_norm(grads, 2.0))
