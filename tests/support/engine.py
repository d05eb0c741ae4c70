"""Small builders shared by the engine tests: tasks on the tiny models, segment chains."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import BudgetTooShortError
from engine.task.definition import TaskDefinition
from engine.task.validation import validate_document
from engine.train.options import StepReport
from engine.train.phases import recording
from engine.train.segment import SegmentOptions, SegmentResult, run_segment

BASE_TASK: dict[str, Any] = {
    "model": {"name": "loraflow/tiny-sd1"},
    "dataset": {"name": "loraflow/demo-shapes"},
    "validation": {"num_images": 1, "num_inference_steps": 2},
    "train_args": {
        "learning_rate": 1e-3,
        "batch_size": 5,
        "gradient_accumulation_steps": 2,
        "scale_lr": False,
        "resolution": 64,
        "num_train_steps": 8,
        "max_train_steps": 8,
        "lr_scheduler": {"lr_scheduler": "cosine", "lr_warmup_steps": 2},
    },
    "lora": {"rank": 4, "init_lora_weights": "gaussian"},
    "transforms": {"center_crop": True, "random_flip": True},
    "seed": 7,
}


def make_task(**changes: Any) -> TaskDefinition:
    """BASE_TASK with nested changes given as dotted keys: make_task(**{"lora.rank": 8})."""
    doc = copy.deepcopy(BASE_TASK)
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validate_document(doc)


def run_chain(task: TaskDefinition, root: Path, *, cache: bool = True, validate: bool = False,
              max_segments: int = 20) -> list[SegmentResult]:
    """Run segments until FINISH, each resuming from the previous one's checkpoint."""
    results: list[SegmentResult] = []
    checkpoint = None
    for i in range(max_segments):
        opts = SegmentOptions(
            checkpoint=checkpoint,
            cache_root=str(root / "cache") if cache else None,
            validate=validate,
        )
        result = run_segment(task, str(root / f"seg{i}"), opts)
        results.append(result)
        checkpoint = result.checkpoint
        if result.finished:
            return results
    raise AssertionError(f"no FINISH after {max_segments} segments")


@dataclass
class BudgetedRun:
    """One segment run under a time budget, with where its time went."""

    result: SegmentResult
    elapsed: float  # wall seconds from the call to the return, commit included
    budget: float  # the budget it finally ran under
    phases: dict[str, float]  # engine.train.phases, for a failure message

    def overrun_message(self) -> str:
        spent = ", ".join(f"{name} {seconds:.2f}" for name, seconds in self.phases.items())
        return (f"committed after {self.elapsed:.2f} s, over the {self.budget:g} s budget "
                f"({self.result.global_step} steps; seconds: {spent})")


def run_budgeted(task: TaskDefinition, output: Path, cache: str, *,
                 budget: float) -> BudgetedRun:
    """Run one segment of ``task`` under ``budget`` seconds, doubling the budget (up to
    12 s) while the machine is too loaded for the budget to test the clock.

    The clock can only budget a step it has measured: the first step of a run's first
    segment is taken blind (README: Time box). So the budget is doubled when start-up
    alone leaves no room for a step (the segment's own BudgetTooShortError; a loaded CI
    machine once spent 1.0 s of 1.5 s starting) and when start-up plus that first step
    used more than half of it (CI's loaded machine once committed at 2.65 s of 2.5 s;
    with two busy processes and a disk writer beside it here, the first step took
    1.5-2.1 s against 0.04 s quiet).
    """
    while True:
        run, first_step_at = _run_once(task, output / f"budget-{budget:g}s", cache, budget)
        if run is not None and first_step_at <= budget / 2:
            return run
        assert budget < 12, f"start-up and one step alone took over {budget / 2:g} s"
        budget *= 2


def _run_once(task: TaskDefinition, output: Path, cache: str,
              budget: float) -> tuple[BudgetedRun | None, float]:
    """The run (None if the budget had no room for a step) and when its first step ended."""
    first_step_at: list[float] = []

    def on_step(report: StepReport) -> None:
        if not first_step_at:
            first_step_at.append(report.elapsed)

    t0 = time.monotonic()
    try:
        with recording() as phases:
            result = run_segment(task, str(output),
                                 SegmentOptions(cache_root=cache, validate=False,
                                                budget_seconds=budget, on_step=on_step))
    except BudgetTooShortError:
        return None, float("inf")
    run = BudgetedRun(result, time.monotonic() - t0, budget, dict(phases.seconds))
    return run, first_step_at[0] if first_step_at else 0.0


def checkpoint_bytes(checkpoint: str) -> dict[str, bytes]:
    """The files that must match bit for bit between equivalent runs."""
    folder = Path(checkpoint)
    state = json.loads((folder / "training_state.json").read_text())
    exact_keys = ("global_step", "epoch", "step_in_epoch", "optimizer", "lr_scheduler")
    exact_state = {k: state[k] for k in exact_keys}
    return {
        "lora": (folder / "pytorch_lora_weights.safetensors").read_bytes(),
        "optimizer": (folder / "optimizer.safetensors").read_bytes(),
        "state": json.dumps(exact_state, sort_keys=True).encode(),
    }
