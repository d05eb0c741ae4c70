"""A CPU AdamW stepped over concatenated weights gives torch's per-weight loop its very bits:
weights, moments, checkpoint files and digests; a resume mid-way too
(engine/train/flat_adamw.py)."""

from __future__ import annotations

import json

import pytest
import torch

from engine.train.digests import optimizer_digest
from engine.train.flat_adamw import FlatAdamW, flat_adamw
from engine.train.optimizers import build_optimizer
from engine.train.state import optimizer_files, restore_optimizer
from tests.support.engine import make_task

#: LoRA-like sizes, odd ones (vector tails) and a channels_last conv weight
SHAPES = [(4, 320), (320, 4), (4, 64), (64, 4), (8,), (3, 7), (2, 3, 3, 3)] * 5
LEFT_OUT = 7  # this weight has no gradient every third step: its own step count


def make_weights() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for w in weights:
        if w.ndim == 4:
            w.data = w.data.to(memory_format=torch.channels_last)
    return weights


def make(cls: type, weights: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    groups = [{"params": weights[:20], "lr": 1e-3}, {"params": weights[20:], "lr": 3e-4}]
    return cls(groups, weight_decay=1e-2, foreach=False)


def step(optimizer: torch.optim.Optimizer, weights: list[torch.nn.Parameter],
         k: int, generator: torch.Generator) -> None:
    for w in weights:  # gradients over five orders of magnitude
        w.grad = None if w is weights[LEFT_OUT] and k % 3 == 0 else (
            torch.randn(w.shape, generator=generator) * 10.0 ** (k % 5 - 2))
    optimizer.step()


def train(cls: type, steps: int = 40, resume_at: int | None = None,
          ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    weights = make_weights()
    optimizer = make(cls, weights)
    names = [f"w{i}" for i in range(len(weights))]
    generator = torch.Generator().manual_seed(1)
    for k in range(steps):
        step(optimizer, weights, k, generator)
        if k == resume_at:  # through the checkpoint files, into a new optimizer
            moments, saved = optimizer_files(optimizer, names)
            optimizer = make(cls, weights)
            restore_optimizer(optimizer, names, moments, json.loads(json.dumps(saved)))
    return weights, optimizer


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    groups = [json.loads(json.dumps(s["param_groups"])) for s in (sa, sb)]  # betas: a list
    assert groups[0] == groups[1]  # foreach=False recorded, as a resume reads it
    assert sa["state"].keys() == sb["state"].keys()
    for index, per_weight in sa["state"].items():
        assert per_weight.keys() == sb["state"][index].keys()
        for key, value in per_weight.items():
            assert torch.equal(value, sb["state"][index][key]), (index, key)


def test_flat_steps_give_the_per_weight_loops_weights_and_moments_bit_for_bit() -> None:
    plain_weights, plain = train(torch.optim.AdamW)
    flat_weights, flat = train(FlatAdamW)
    for a, b in zip(plain_weights, flat_weights, strict=True):
        assert torch.equal(a, b)
        assert a.is_contiguous(memory_format=torch.channels_last) == \
            b.is_contiguous(memory_format=torch.channels_last)
    assert_same_state(plain, flat)


def test_the_checkpoint_files_and_digest_are_the_per_weight_loops_bytes() -> None:
    plain_weights, plain = train(torch.optim.AdamW, steps=9)
    flat_weights, flat = train(FlatAdamW, steps=9)
    names = [f"w{i}" for i in range(len(SHAPES))]
    assert optimizer_files(plain, names) == optimizer_files(flat, names)
    by_name = dict(zip(names, plain_weights, strict=True))
    flat_by_name = dict(zip(names, flat_weights, strict=True))
    assert optimizer_digest(plain, by_name, None) == optimizer_digest(flat, flat_by_name, None)


@pytest.mark.parametrize("resume_at", [0, 4, 17])
def test_a_resume_from_the_files_goes_on_bit_for_bit(resume_at: int) -> None:
    plain_weights, plain = train(torch.optim.AdamW)
    flat_weights, flat = train(FlatAdamW, resume_at=resume_at)
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, flat_weights, strict=True))
    assert_same_state(plain, flat)


def test_the_tasks_adamw_on_a_cpu_is_flat_and_records_the_per_weight_loop() -> None:
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = build_optimizer(make_task(), [{"params": [weight], "lr": 1e-3}])
    assert type(optimizer) is FlatAdamW
    assert optimizer.param_groups[0]["foreach"] is False
    weight.grad = torch.ones(4, 4)
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 1.0


def test_other_adamw_settings_get_torchs_own() -> None:
    weights = [torch.nn.Parameter(torch.ones(3))]
    for options in ({"foreach": True}, {"fused": True}, {"foreach": False, "amsgrad": True}):
        assert type(flat_adamw([{"params": weights}], **options)) is torch.optim.AdamW


def test_the_step_runs_without_torchs_per_class_profiler_record() -> None:
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = FlatAdamW([{"params": [weight], "lr": 0.1}], foreach=False)
    weight.grad = torch.ones(4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer.step()
    names = {event.name for event in prof.events()}
    assert not any(name.startswith("Optimizer.step#") for name in names)
    assert float(weight.detach()[0]) < 1.0  # it stepped
