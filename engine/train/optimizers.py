"""The optimizers a task can pick, each built from its own options in the task.

``train_args.optimizer.name`` picks one; AdamW (torch, ``foreach=False`` on a CPU, stepped
over concatenated weights with the same bits: flat_adamw.py; fused on CUDA) stays the
default and is built on a CPU exactly as before, so a task that names none trains to the
same bytes. The others come from well-kept libraries installed as
extras: bitsandbytes (``loraflow[bnb]``), prodigyopt and schedulefree
(``loraflow[optimizers]``); Adafactor is transformers' own. :func:`check_optimizer`
refuses, before any model is loaded, an optimizer whose library is missing or that cannot
run on the training device.

Schedule-free AdamW evaluates its gradients at other weights than it publishes: between
two steps the trainer keeps it in eval mode (:func:`leave_step`), so the weights a
checkpoint saves, a validation renders and a user loads are its averaged ones, and a
resumed run performs the same mode switches as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from engine.task.definition import TaskDefinition
from engine.task.validation import Problem, TaskValidationError
from engine.train.flat_adamw import flat_adamw

#: optimizer name -> (module it needs, the extra that installs it)
LIBRARIES: dict[str, tuple[str, str]] = {
    "adamw8bit": ("bitsandbytes", "loraflow[bnb]"),
    "prodigy": ("prodigyopt", "loraflow[optimizers]"),
    "schedule_free_adamw": ("schedulefree", "loraflow[optimizers]"),
}


def build_optimizer(task: TaskDefinition, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The task's optimizer over ``groups`` (param groups with their lr)."""
    ta = task.train_args
    choice, adam = ta.optimizer, ta.adam_args
    betas = (adam.beta1, adam.beta2)
    opts: Any = choice.options
    if choice.name == "adamw":
        return flat_adamw(  # on a CPU one pass over all weights, same bits (flat_adamw.py)
            groups, betas=betas, weight_decay=adam.weight_decay, eps=adam.epsilon,
            **adamw_kernel(groups))
    if choice.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=adam.weight_decay,
                                   eps=adam.epsilon, min_8bit_size=opts.min_8bit_size)
    if choice.name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(
            groups, betas=betas, beta3=opts.beta3, eps=adam.epsilon,
            weight_decay=adam.weight_decay, decouple=opts.decouple,
            use_bias_correction=opts.use_bias_correction,
            safeguard_warmup=opts.safeguard_warmup, d0=opts.d0, d_coef=opts.d_coef,
            growth_rate=float("inf") if opts.growth_rate is None else opts.growth_rate,
        )
    if choice.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups, eps=(opts.eps1, opts.eps2), clip_threshold=opts.clip_threshold,
            decay_rate=opts.decay_rate, beta1=opts.beta1, weight_decay=opts.weight_decay,
            scale_parameter=opts.scale_parameter, relative_step=False, warmup_init=False,
        )
    if choice.name == "schedule_free_adamw":
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(
            groups, betas=betas, eps=adam.epsilon, weight_decay=adam.weight_decay,
            warmup_steps=opts.warmup_steps, r=opts.r, weight_lr_power=opts.weight_lr_power,
            foreach=False,
        )
        optimizer.eval()  # the weights between steps are the averaged ones (see above)
        return optimizer
    raise ValueError(f"unknown optimizer {choice.name!r}")  # the schema refuses it first


def adamw_kernel(groups: list[dict[str, Any]]) -> dict[str, bool]:
    """AdamW's implementation: fused on CUDA (one kernel for every weight, elementwise and
    so deterministic), the per-weight loop elsewhere, whose bits CPU checkpoints hold."""
    cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return {"fused": True} if cuda and groups else {"foreach": False}


# -- refusing what cannot run, before any model is loaded --------------------------------


def optimizer_problems(task: TaskDefinition, device: torch.device) -> list[Problem]:
    """Why the task's optimizer cannot run here (library missing, device unsupported)."""
    name = task.train_args.optimizer.name
    where = "/train_args/optimizer/name"
    if name in LIBRARIES:
        module, extra = LIBRARIES[name]
        if importlib.util.find_spec(module) is None:
            return [Problem(where, f"optimizer {name!r} needs the {module} package, which is "
                                   f"not installed: pip install '{extra}'")]
    if name == "adamw8bit":
        reason = _adamw8bit_fails_on(device)
        if reason:
            return [Problem(where, f"optimizer 'adamw8bit' (bitsandbytes) does not run on "
                                   f"device {device} here ({reason}); use a CUDA GPU, or "
                                   f"pick 'adamw' or 'adafactor'")]
    return []


def check_optimizer(task: TaskDefinition, device: torch.device) -> None:
    """Raise :class:`TaskValidationError` when the task's optimizer cannot run on ``device``."""
    problems = optimizer_problems(task, device)
    if problems:
        raise TaskValidationError(problems, "task")


def _adamw8bit_fails_on(device: torch.device) -> str | None:
    """One quantized step on a small tensor: bitsandbytes' kernels exist for some devices
    only (CUDA; 0.50 also CPU), and this asks the installed build directly."""
    try:
        import bitsandbytes as bnb

        weight = torch.nn.Parameter(torch.zeros(4096, device=device))
        weight.grad = torch.ones_like(weight)
        bnb.optim.AdamW8bit([weight], min_8bit_size=1).step()
    except Exception as exc:  # noqa: BLE001 - whatever the build lacks, the answer is "no"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


# -- modes around a step ----------------------------------------------------------------


def enter_step(optimizer: torch.optim.Optimizer) -> None:
    """Before the forward pass: schedule-free AdamW to the weights it takes gradients at."""
    if _has_modes(optimizer):
        optimizer.train()


def leave_step(optimizer: torch.optim.Optimizer) -> None:
    """After the update: schedule-free AdamW back to its averaged weights."""
    if _has_modes(optimizer):
        optimizer.eval()


def _has_modes(optimizer: torch.optim.Optimizer) -> bool:
    return "train_mode" in optimizer.param_groups[0]


def state_tensor_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors the optimizer keeps per weight (its memory beyond the weights)."""
    return sum(v.numel() * v.element_size() for per_param in optimizer.state.values()
               for v in per_param.values() if isinstance(v, torch.Tensor))
