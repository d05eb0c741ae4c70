"""Gradient clipping that skips the multiply when there is nothing to clip, same bits.

Why: ``torch.nn.utils.clip_grad_norm_`` always multiplies every gradient by the clamped
coefficient ``min(max_norm / (norm + 1e-6), 1)`` (on purpose: deciding would need a host
sync on a GPU). A LoRA's gradient norm is usually below ``max_norm``, so the coefficient
is exactly 1.0 and the multiply rewrites every gradient with itself: ~64 small kernel
launches a step on tiny-sd1's adapter. ``g * 1.0 == g`` bit for bit for every float
(a NaN norm gives a NaN coefficient, which is not 1.0, so NaNs still go through torch's
multiply), so on a CPU, where reading the coefficient costs nothing, it is skipped.
Elsewhere torch's own function runs unchanged. When the norm is clearly below
``max_norm`` (by more than a relative 1e-6) the coefficient is not even computed: torch's
float32 ``max_norm / (norm + 1e-6)`` then exceeds 1 by more than its three roundings
(~2e-7) can take away, so it clamps to exactly 1.0 (its four small ops cost ~0.06 ms right
after the backward); near ``max_norm``, and for a NaN or infinite norm, torch's own
coefficient decides.

The norm itself, on a CPU, is torch's ``get_total_norm`` (the 2-norm of the per-weight
2-norms) with the per-weight norms taken a size at a time: the gradients of one size laid
as the rows of one matrix and normed along its rows, one kernel call instead of one per
weight (tiny-sd1's 64 tensors: 0.09 ms instead of 0.11 warm, ~0.2 ms less in the step).
A row's norm is the norm of that weight alone bit for bit (torch reduces each last-dim
row with the loop it uses for a whole 1-d tensor: checked on the default, AVX2 and AVX512
kernels, 1 to 4 threads, rows of 1 to 15 million numbers,
``tests/engine/train/test_grad_clip.py``), and the per-weight norms are then put back in
the weights' order before the outer norm, as torch stacks them.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import torch
from torch._utils import _flatten_dense_tensors


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to total 2-norm ``max_norm``; returns the norm
    before clipping, as ``clip_grad_norm_`` does (same value, same clipped bits)."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not _plain_cpu(grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = _size_at_a_time_norm(grads)
    if total.item() + 1e-6 < max_norm * (1 - 1e-6):  # clearly below: the coefficient is 1.0
        return total
    coefficient = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)  # torch's own
    if coefficient.item() != 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm(grads, 2.0)``, same bits, fewer kernel calls on a CPU
    (see above); anything but contiguous CPU gradients of one dtype goes to torch's own."""
    if not _plain_cpu(grads):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    return _size_at_a_time_norm(grads)


def _plain_cpu(grads: list[torch.Tensor]) -> bool:
    """Some gradients, all contiguous, on the CPU, of one dtype: what the norm a size at a
    time takes (one pass: right after the backward each attribute read runs cold)."""
    if not grads:
        return False
    dtype = grads[0].dtype
    return all(g.is_cpu and g.dtype == dtype and g.is_contiguous() for g in grads)


def _size_at_a_time_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    groups, back = _by_size(tuple(g.numel() for g in grads))
    row_norms = torch.cat([
        torch.linalg.vector_norm(
            _flatten_dense_tensors([grads[i] for i in indices]).view(len(indices), size),
            2.0, dim=1)
        for size, indices in groups])
    return torch.linalg.vector_norm(row_norms[back], 2.0)  # in the weights' order


@lru_cache(maxsize=8)
def _by_size(sizes: tuple[int, ...]) -> tuple[list[tuple[int, list[int]]], torch.Tensor]:
    """(each size with the positions of the weights of that size; where each weight's norm
    lands among the sizes' row norms): the same few layouts every step, worked out once."""
    by_size: dict[int, list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    order = [i for indices in by_size.values() for i in indices]
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return list(by_size.items()), back
