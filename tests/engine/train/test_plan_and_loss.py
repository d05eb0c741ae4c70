"""Pure pieces of the training step: the plan, min-SNR weights, schedules that resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from engine.train.loss import min_snr_weights, snr
from engine.train.plan import TrainingPlan
from engine.train.seeding import derive_seed, generator
from engine.train.state import restore_scheduler, scheduler_state


def plan(size=24, batch=5, accumulation=2, max_steps=None, epochs=2) -> TrainingPlan:
    return TrainingPlan(size, batch, accumulation, seed=3, max_train_steps=max_steps,
                        max_train_epochs=epochs, segment_steps=None, segment_epochs=1)


def test_each_epoch_uses_every_example_exactly_once() -> None:
    p = plan()
    assert (p.micro_batches_per_epoch, p.steps_per_epoch, p.total_steps) == (5, 3, 6)
    for epoch in range(2):
        steps = range(epoch * p.steps_per_epoch, (epoch + 1) * p.steps_per_epoch)
        refs = [r for s in steps for mb in p.micro_batches(s) for r in mb]
        assert {r.epoch for r in refs} == {epoch}
        assert Counter(r.index for r in refs) == Counter(range(24))


def test_epochs_are_shuffled_differently_and_reproducibly() -> None:
    p = plan()
    first = [r.index for mb in p.micro_batches(0) for r in mb]
    again = [r.index for mb in plan().micro_batches(0) for r in mb]
    next_epoch = [r.index for mb in p.micro_batches(3) for r in mb]
    assert first == again and first != next_epoch


def test_last_step_of_an_epoch_accumulates_what_is_left() -> None:
    p = plan()
    assert [len(p.micro_batches(s)) for s in range(3)] == [2, 2, 1]
    assert [len(mb) for mb in p.micro_batches(2)] == [4]


def test_segment_end_never_passes_the_whole_training() -> None:
    p = TrainingPlan(24, 5, 2, 3, max_train_steps=7, max_train_epochs=1, segment_steps=4,
                     segment_epochs=1)
    assert (p.segment_end(0), p.segment_end(4), p.total_steps) == (4, 7, 7)
    by_epoch = plan(epochs=3)
    assert by_epoch.segment_end(1) == 4  # num_train_epochs=1 -> steps_per_epoch steps


def test_derived_seeds_differ_by_purpose_and_counter_and_are_stable() -> None:
    assert derive_seed(0, "noise", 1, 2) == derive_seed(0, "noise", 1, 2)
    assert len({derive_seed(0, "noise", 1, 2), derive_seed(0, "noise", 2, 1),
                derive_seed(0, "crop", 1, 2), derive_seed(1, "noise", 1, 2)}) == 4
    with pytest.raises(ValueError):
        generator(0, "not-a-purpose")


def test_min_snr_weights_match_the_x0_weighting_for_each_target() -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([1, 50, 300, 700, 999])
    s = snr(scheduler, t)
    gamma = 5.0
    eps = min_snr_weights(s, gamma, "epsilon")
    v = min_snr_weights(s, gamma, "v_prediction")
    # epsilon error = SNR * x0 error; v error = (SNR + 1) * x0 error:
    # both must give min(SNR, gamma).
    assert torch.allclose(eps * s, torch.clamp(s, max=gamma))
    assert torch.allclose(v * (s + 1), torch.clamp(s, max=gamma))
    assert (v < eps).all()


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial",
                                  "constant", "constant_with_warmup"])
def test_every_lr_schedule_resumes_to_the_same_learning_rates(name: str) -> None:
    def fresh():
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([param], lr=1e-3)
        return opt, get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=12)

    opt, sched = fresh()
    straight = []
    for _ in range(12):
        straight.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt, sched = fresh()
    resumed = []
    for _ in range(5):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    saved, lr_now = scheduler_state(sched), opt.param_groups[0]["lr"]
    opt, sched = fresh()
    restore_scheduler(sched, saved)
    opt.param_groups[0]["lr"] = lr_now  # the optimizer state carries the lr in a checkpoint
    for _ in range(7):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert resumed == straight
    if name != "constant":
        assert straight[0] == 0.0 and straight[3] == pytest.approx(1e-3)
