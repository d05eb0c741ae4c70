"""AdamW on a CPU: the step runs torch's multi-tensor (foreach) loop, same bits, less Python.

Why: loraflow builds AdamW with ``foreach=False`` on a CPU, and that flag is part of what a
checkpoint and the digest trail record (the optimizer's param groups), so it stays. But
on a CPU torch's foreach ops are the per-tensor ops looped in C++: ``_multi_tensor_adam``
runs the same ``lerp_``/``mul_``/``addcmul_``/``sqrt``/``div_``/``add_``/``addcdiv_`` on
each weight as ``_single_tensor_adam``, with the same Python-float step sizes, so the
weights and moments come out bit for bit the same (``tests/engine/train/
test_foreach_steps.py`` checks it over many steps and two learning rates, and the golden
check over whole trainings), in ~40% less time on the ~64 small LoRA weights of tiny-sd1.

:func:`foreach_steps` therefore switches the groups to foreach for the duration of
``step()`` only (optimizer step hooks), and back before anything can save or hash them.
"""

from __future__ import annotations

from typing import Any

import torch


def foreach_steps(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer``, stepping with foreach when it is a CPU AdamW built with
    ``foreach=False`` (anything else is returned untouched)."""
    groups = optimizer.param_groups
    if type(optimizer) is not torch.optim.AdamW or not groups:
        return optimizer
    if any(g.get("foreach") is not False or g.get("fused") or g.get("differentiable")
           or g.get("capturable") for g in groups):
        return optimizer
    if any(p.device.type != "cpu" for g in groups for p in g["params"]):
        return optimizer
    optimizer.register_step_pre_hook(_foreach_on)
    optimizer.register_step_post_hook(_foreach_off)
    return optimizer


def _foreach_on(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        group["foreach"] = True


def _foreach_off(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        group["foreach"] = False
