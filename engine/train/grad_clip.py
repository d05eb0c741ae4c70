"""Gradient clipping that skips the multiply when there is nothing to clip, same bits.

Why: ``torch.nn.utils.clip_grad_norm_`` always multiplies every gradient by the clamped
coefficient ``min(max_norm / (norm + 1e-6), 1)`` (on purpose: deciding would need a host
sync on a GPU). A LoRA's gradient norm is usually below ``max_norm``, so the coefficient
is exactly 1.0 and the multiply rewrites every gradient with itself: ~64 small kernel
launches a step on tiny-sd1's adapter. ``g * 1.0 == g`` bit for bit for every float
(a NaN norm gives a NaN coefficient, which is not 1.0, so NaNs still go through torch's
multiply), so on a CPU, where reading the coefficient costs nothing, it is skipped.
Elsewhere torch's own function runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to total 2-norm ``max_norm``; returns the norm
    before clipping, as ``clip_grad_norm_`` does (same value, same clipped bits)."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(g.device.type != "cpu" for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    coefficient = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)  # torch's own
    if coefficient.item() != 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
