"""The trainer: the LoRA's parameters, optimizer, schedule and step counter, and the step.

:class:`Trainer` is the whole mutable state of training. Only :func:`train_step` advances
it and only :func:`engine.train.resume.restore` sets it from a checkpoint, so what a
checkpoint holds (:func:`engine.train.saver.checkpoint_files`) is exactly this object.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from engine.model.family import unet_extra_inputs
from engine.model.loading import BaseModel, add_lora_adapters, lora_parameters
from engine.model.precision import autocast
from engine.task.definition import TaskDefinition
from engine.train.compiled import compile_unet_blocks
from engine.train.distributed import SINGLE, World, sum_gradients
from engine.train.ema import Ema, ema_of
from engine.train.full_finetune import (
    full_parameters,
    is_full,
    text_encoder_learning_rate,
    trainable_modules,
)
from engine.train.grad_clip import clip_gradients
from engine.train.loss import loss_weights, per_sample_loss, target_for
from engine.train.new_token_state import new_token_groups
from engine.train.noising import NoiseTables
from engine.train.optimizers import build_optimizer, enter_step, leave_step
from engine.train.plan import TrainingPlan
from engine.train.samples import Batch


@dataclass
class Trainer:
    base: BaseModel
    plan: TrainingPlan
    adapted: dict[str, Any]  # {"unet": unet, "text_encoder": ..., ...}: modules with a LoRA
    params: dict[str, torch.nn.Parameter]  # "unet.<name>" -> parameter, stable order
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Any  # torch.amp.GradScaler for fp16 on CUDA, else None
    prediction_type: str
    snr_gamma: float | None
    max_grad_norm: float
    global_step: int = 0
    ema: Ema | None = None  # the average of ``params`` (train_args.ema), None when not asked
    full: bool = False  # training_type "full": params are every weight, not a LoRA
    #: the processes sharing each step (engine/train/distributed.py); not checkpointed
    world: World = SINGLE

    @property
    def finished(self) -> bool:
        """The whole training is done (not only this segment)."""
        return self.global_step >= self.plan.total_steps

    @cached_property
    def noising(self) -> NoiseTables:
        """The scheduler's add_noise and velocity target, from tables (noising.py)."""
        return NoiseTables(self.base.noise_scheduler)

    def autocast(self) -> AbstractContextManager:
        return autocast(self.base.device, self.base.dtype)


def build_trainer(task: TaskDefinition, base: BaseModel, plan: TrainingPlan) -> Trainer:
    """Adapters on ``base``, the task's optimizer over their parameters (AdamW unless
    ``train_args.optimizer`` names another), the lr schedule, the EMA: at step 0."""
    full = is_full(task)  # training_type "full": every weight of the UNet, no adapter
    adapted = trainable_modules(base, task) if full else add_lora_adapters(base, task)
    ta = task.train_args
    base.unet.to(base.device)
    if ta.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    if ta.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        base.unet.train()  # diffusers checkpoints only in training mode
    if ta.compile:  # after the adapters: the compiled blocks hold them
        compile_unet_blocks(base.unet)
    scale = ta.gradient_accumulation_steps * ta.batch_size if ta.scale_lr else 1  # one process
    groups, params = [], {}
    for prefix, module in adapted.items():
        trained = full_parameters(module) if full else lora_parameters(module)
        named = {f"{prefix}.{n}": p for n, p in trained.items()}
        params |= named
        lr = ta.learning_rate
        if prefix != "unet" and (te_lr := text_encoder_learning_rate(task)) is not None:
            lr = te_lr
        groups.append({"params": list(named.values()), "lr": lr * scale})
    token_groups, token_params = new_token_groups(task, base, scale)  # lora.new_tokens
    groups, params = groups + token_groups, params | token_params
    optimizer = build_optimizer(task, groups)  # train_args.optimizer; AdamW by default
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        ta.lr_scheduler.lr_scheduler, optimizer,
        num_warmup_steps=ta.lr_scheduler.lr_warmup_steps, num_training_steps=plan.total_steps,
    )
    scaler = None
    if base.dtype == torch.float16 and base.device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    return Trainer(
        base=base, plan=plan, adapted=adapted, params=params, optimizer=optimizer,
        lr_scheduler=lr_scheduler, scaler=scaler,
        prediction_type=ta.prediction_type or base.noise_scheduler.config.prediction_type,
        snr_gamma=ta.snr_gamma, max_grad_norm=ta.max_grad_norm, ema=ema_of(task, params),
        full=full,
    )


def micro_batch_loss(tr: Trainer, batch: Batch) -> torch.Tensor:
    """The summed per-sample diffusion loss of one micro-batch (fp32), each sample's
    scaled by its subset's loss weight."""
    noisy = tr.noising.add_noise(batch.latents, batch.noise, batch.timesteps)
    with tr.autocast():
        extra = unet_extra_inputs(tr.base.family, batch.conditioning, batch.time_ids)
        prediction = tr.base.unet(noisy, batch.timesteps, **extra).sample
    target = target_for(tr.noising, tr.prediction_type, batch.latents, batch.noise,
                        batch.timesteps)
    weights = loss_weights(tr.base.noise_scheduler, batch.timesteps, tr.snr_gamma,
                           tr.prediction_type)
    losses = per_sample_loss(prediction, target, weights, batch.masks)
    if batch.sample_weights is not None:  # subsets' loss_weight; None keeps the old bits
        losses = losses * batch.sample_weights
    return losses.sum()


def train_step(tr: Trainer, batches: Iterator[Batch | None]) -> dict[str, float]:
    """One optimizer step over the step's micro-batches, taken from ``batches``
    (:func:`engine.train.stream.batch_stream`); returns its metrics.

    The loss is the mean over the step's samples (a short micro-batch, a bucket's
    remainder or the epoch's last, weighs by its size), whatever the accumulation. A
    subset's loss weight scales its samples' terms; the divisor stays the sample count,
    so a weight of 2 counts a sample twice and weights of 1 are the plain mean.
    """
    refs = tr.plan.micro_batches(tr.global_step)
    n_samples = sum(len(r) for r in refs)
    # summed on the device in fp64, read once per step: the same number as adding each
    # micro-batch's loss.item() as Python floats, without a host sync per micro-batch
    loss_total = None
    enter_step(tr.optimizer)
    for _ in refs:
        if (batch := next(batches)) is None:  # this rank's share of it is empty
            continue
        loss = micro_batch_loss(tr, batch) / n_samples
        (tr.scaler.scale(loss) if tr.scaler else loss).backward()
        part = loss.detach().double()
        loss_total = part if loss_total is None else loss_total + part
    if loss_total is None:  # no sample of this step is this rank's
        loss_total = torch.zeros((), dtype=torch.float64, device=tr.base.device)
    loss_total = sum_gradients(tr.params.values(), loss_total, tr.world)  # over the ranks
    if tr.scaler:
        tr.scaler.unscale_(tr.optimizer)
    grad_norm = clip_gradients(tr.params.values(), tr.max_grad_norm)  # same bits (grad_clip)
    lr = tr.optimizer.param_groups[0]["lr"]
    if tr.scaler:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()
    tr.lr_scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    leave_step(tr.optimizer)
    tr.global_step += 1
    if tr.ema is not None:
        tr.ema.update(tr.params, tr.global_step)
    return {"loss": loss_total.item(), "lr": lr, "grad_norm": float(grad_norm),
            "samples": n_samples}
