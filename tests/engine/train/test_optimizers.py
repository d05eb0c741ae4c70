"""Each optimizer a task can pick trains, saves its state without pickle and resumes
exactly: k segments give the bytes of one run; one that cannot run here is refused
before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.task.definition import TaskDefinition
from engine.task.validation import TaskValidationError
from engine.train.optimizers import build_optimizer, enter_step, leave_step, optimizer_problems
from engine.train.segment import SegmentOptions, run_segment
from engine.train.state import optimizer_files, restore_optimizer
from tests.support.engine import checkpoint_bytes, make_task, run_chain

CPU_OPTIMIZERS = {
    "prodigy": {"name": "prodigy", "prodigy": {"d0": 1e-4}},
    "adafactor": {"name": "adafactor", "adafactor": {"beta1": 0.9}},
    "schedule_free_adamw": {"name": "schedule_free_adamw",
                            "schedule_free_adamw": {"warmup_steps": 2}},
    # min_8bit_size below the tiny LoRA's sizes, so the moments really are 8-bit
    "adamw8bit": {"name": "adamw8bit", "adamw8bit": {"min_8bit_size": 16}},
}


def optimizer_task(choice: dict, **changes) -> TaskDefinition:
    return make_task(**{"train_args.optimizer": choice}, **changes)


def steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], seed: int,
          n: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        enter_step(optimizer)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        leave_step(optimizer)


@pytest.mark.parametrize("name", ["adamw", *CPU_OPTIMIZERS])
def test_saved_state_continues_exactly_like_the_uninterrupted_optimizer(name: str) -> None:
    task = optimizer_task(CPU_OPTIMIZERS.get(name, {"name": "adamw"}))
    names = ["a", "b"]

    def fresh() -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(32))]
        return build_optimizer(task, [{"params": params, "lr": 1e-2}]), params

    whole, whole_params = fresh()
    steps(whole, whole_params, seed=1, n=3)
    steps(whole, whole_params, seed=2, n=3)

    first, first_params = fresh()
    steps(first, first_params, seed=1, n=3)
    moments, saved = optimizer_files(first, names)
    saved = json.loads(json.dumps(saved))  # as training_state.json holds it
    resumed, resumed_params = fresh()
    with torch.no_grad():
        for p, q in zip(resumed_params, first_params, strict=True):
            p.copy_(q)
    restore_optimizer(resumed, names, moments, saved)
    steps(resumed, resumed_params, seed=2, n=3)
    for p, q in zip(whole_params, resumed_params, strict=True):
        assert torch.equal(p, q)


def test_default_adamw_state_has_no_scalars_entry() -> None:
    params = [torch.nn.Parameter(torch.ones(4))]
    optimizer = build_optimizer(make_task(), [{"params": params, "lr": 1e-3}])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["foreach"] is False
    steps(optimizer, params, seed=0, n=1)
    assert "scalars" not in optimizer_files(optimizer, ["w"])[1]


@pytest.mark.parametrize("name", sorted(CPU_OPTIMIZERS))
def test_three_segments_give_the_bytes_of_one_run(name: str, tmp_path: Path) -> None:
    one = run_chain(optimizer_task(CPU_OPTIMIZERS[name]), tmp_path / "one")
    three = run_chain(optimizer_task(CPU_OPTIMIZERS[name], **{"train_args.num_train_steps": 3}),
                      tmp_path / "three")
    assert len(one) == 1 and len(three) == 3
    assert checkpoint_bytes(one[-1].checkpoint) == checkpoint_bytes(three[-1].checkpoint)


def test_adamw8bit_keeps_8_bit_moments(tmp_path: Path) -> None:
    result = run_segment(optimizer_task(CPU_OPTIMIZERS["adamw8bit"],
                                        **{"train_args.num_train_steps": 1}),
                         str(tmp_path / "seg"), SegmentOptions(validate=False))
    moments = load_tensors((Path(result.checkpoint) / "optimizer.safetensors").read_bytes())
    assert any(k.endswith("::state1") and v.dtype == torch.uint8 for k, v in moments.items())


def test_schedule_free_checkpoints_its_averaged_eval_weights(tmp_path: Path) -> None:
    task = optimizer_task(CPU_OPTIMIZERS["schedule_free_adamw"],
                          **{"train_args.num_train_steps": 2})
    result = run_segment(task, str(tmp_path / "seg"), SegmentOptions(validate=False))
    state = json.loads((Path(result.checkpoint) / "training_state.json").read_text())
    assert [g["train_mode"] for g in state["optimizer"]["param_groups"]] == [False]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_optimizer_the_device_cannot_run_is_refused_before_the_model_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = optimizer_task({"name": "adamw8bit"})
    assert optimizer_problems(task, torch.device("cpu")) == []  # bitsandbytes 0.50 runs
    problems = optimizer_problems(task, torch.device("cuda"))
    assert [p.pointer for p in problems] == ["/train_args/optimizer/name"]
    assert "does not run on device cuda" in problems[0].message
    monkeypatch.setenv("LORAFLOW_DEVICE", "cuda")  # asked for, but this machine has none
    with pytest.raises(TaskValidationError, match="adamw8bit"):
        run_segment(task, str(tmp_path / "seg"), SegmentOptions(validate=False))
    assert not (tmp_path / "seg").exists()


def test_options_of_another_optimizer_are_refused() -> None:
    with pytest.raises(TaskValidationError, match="options for prodigy are given"):
        optimizer_task({"name": "adamw", "prodigy": {"d0": 1e-5}})
    with pytest.raises(TaskValidationError, match="/train_args/optimizer/adafactor/decay_rate"):
        optimizer_task({"name": "adafactor", "adafactor": {"decay_rate": 0.5}})
