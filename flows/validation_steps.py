"""Validation every N steps in the flow: which checkpoints, when, and what the UI shows.

With ``validation.validation_steps`` = N (a multiple of ``checkpointing_steps``), every
segment commits a checkpoint at each multiple of N it passes: an in-segment one under
``segments/NNNN/checkpoints/`` (those fall on global multiples of
``checkpointing_steps``, wherever a budget ended the previous segment), or its final one
when it ends there. After a segment returns, the flow submits one ``validate-step`` task
per such checkpoint. The segment never waits for them and its clock never counts them.

Where they run: when segments are dispatched to a deployment (other workers), the
validations run here while the next segment trains there; when segments train in this
process, each validation is waited for before the next segment starts, so that two
models never share one device (and its memory) at once. Validations run one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.infer.step_validation import is_validation_step
from engine.store import storage
from engine.store.commit import list_committed, read_manifest
from engine.task.definition import TaskDefinition
from engine.train.saver import INTERMEDIATE_DIR
from flows import artifacts
from tasks.payloads import DatasetSummary, SegmentSummary
from tasks.validation import StepValidationResult, validate_step


def checkpoints_to_validate(task: TaskDefinition, segment: SegmentSummary) -> list[tuple[int, str]]:
    """(step, checkpoint URL) of each validated step this segment committed, in order."""
    r = segment.result
    found: dict[int, str] = {}
    root = storage.join(segment.output_dir, INTERMEDIATE_DIR)
    for url in list_committed(root) if storage.exists(root) else []:
        found.setdefault(read_manifest(url).global_step, url)
    found[r.global_step] = r.checkpoint  # the segment's result wins over an in-segment copy
    return [(s, found[s]) for s in sorted(found)
            if r.start_step < s <= r.global_step and is_validation_step(task, s)]


@dataclass
class StepValidations:
    """The validated steps of one flow run: submitted after each segment, shown as done."""

    task: TaskDefinition
    output_dir: str
    dataset: DatasetSummary
    data_dir: str | None
    concurrent: bool  # True: segments train elsewhere, so validations overlap them
    _pending: list[Any] = field(default_factory=list, init=False)
    done: list[StepValidationResult] = field(default_factory=list, init=False)

    def after_segment(self, segment: SegmentSummary) -> None:
        """Submit the validations of the steps ``segment`` committed."""
        for step, checkpoint in checkpoints_to_validate(self.task, segment):
            # one after another: two model loads at once in one process are not safe
            # (diffusers / transformers initialise modules on a process-wide meta device)
            after = self._pending[-1:] or None
            future = validate_step.with_options(task_run_name=f"validate-step {step}").submit(
                self.task, checkpoint, self.output_dir, self.dataset, data_dir=self.data_dir,
                wait_for=after,
            )
            self._pending.append(future)
        if not self.concurrent:
            self.wait()

    def wait(self) -> list[StepValidationResult]:
        """Wait for every submitted validation (a failed one fails the run), then show all."""
        if self._pending:
            pending, self._pending = self._pending, []
            self.done += [future.result() for future in pending]
            self.done.sort(key=lambda v: v.global_step)
            artifacts.show_validation_steps(self.output_dir, self.done)
        return self.done


def run_rows(done: list[StepValidationResult]) -> list[dict[str, Any]]:
    """The validated steps as the flow returns them: step, folder, loss per adapter."""
    return [{"global_step": v.global_step, "folder": v.folder, "loss": dict(v.loss),
             "source": v.source, "images": {k: list(u) for k, u in v.images.items()}}
            for v in done]
