"""Small builders shared by the engine tests: tasks on the tiny models, segment chains."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from engine.errors import BudgetTooShortError
from engine.task.definition import TaskDefinition
from engine.task.validation import validate_document
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


def run_budgeted(task: TaskDefinition, output: Path, cache: str, *,
                 budget: float) -> tuple[SegmentResult, float, float]:
    """Run one segment of ``task`` under ``budget`` seconds, doubling the budget while
    start-up alone leaves no room for a step (the segment's own BudgetTooShortError): a
    loaded CI machine once spent 1.0 s of a 1.5 s budget starting. Returns the result,
    its wall time and the budget it ran under."""
    while True:
        t0 = time.monotonic()
        try:
            result = run_segment(task, str(output / f"budget-{budget:g}s"),
                                 SegmentOptions(cache_root=cache, validate=False,
                                                budget_seconds=budget))
        except BudgetTooShortError:
            assert budget < 12, f"start-up alone took over {budget} s"
            budget *= 2
            continue
        return result, time.monotonic() - t0, budget


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
