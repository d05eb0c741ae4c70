"""A CPU AdamW steps with torch's foreach loop and gives the per-weight loop's bits, while
its param groups (what checkpoints record) still say foreach=False
(engine/train/foreach_steps.py)."""

from __future__ import annotations

import torch

from engine.train.foreach_steps import foreach_steps
from engine.train.optimizers import build_optimizer
from tests.support.engine import make_task

SHAPES = [(4, 320), (320, 4), (4, 64), (64, 4), (8,)] * 6


def train(wrap: bool, steps: int = 40) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    groups = [{"params": weights[:20], "lr": 1e-3}, {"params": weights[20:], "lr": 3e-4}]
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2, foreach=False)
    if wrap:
        foreach_steps(optimizer)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for w in weights:  # gradients over five orders of magnitude, one weight left out
            w.grad = None if w is weights[7] and step % 3 == 0 else (
                torch.randn(w.shape, generator=g) * 10.0 ** (step % 5 - 2))
        optimizer.step()
    return [w.detach().clone() for w in weights], optimizer.state_dict()


def test_foreach_steps_give_the_per_weight_loops_weights_and_moments_bit_for_bit() -> None:
    plain_weights, plain_state = train(wrap=False)
    weights, state = train(wrap=True)
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, weights, strict=True))
    for index, per_weight in plain_state["state"].items():
        for key, value in per_weight.items():
            assert torch.equal(value, state["state"][index][key]), (index, key)
    assert state["param_groups"] == plain_state["param_groups"]  # foreach=False recorded


def test_the_tasks_adamw_on_a_cpu_runs_the_foreach_loop_inside_step_only() -> None:
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = build_optimizer(make_task(), [{"params": [weight], "lr": 1e-3}])
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["foreach"]))
    weight.grad = torch.ones(4, 4)
    optimizer.step()
    assert seen == [True]
    assert optimizer.param_groups[0]["foreach"] is False


def test_other_optimizers_are_left_as_built() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([weight], lr=0.1)
    adamw_foreach = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], foreach=True)
    for optimizer in (sgd, adamw_foreach):
        assert foreach_steps(optimizer) is optimizer
        assert not optimizer._optimizer_step_pre_hooks
