"""Where training is, as a pure function of the global step.

Epoch, position in the epoch, which samples form each micro-batch, and when this
segment and the whole training end: all derived from (task, dataset size, global step).
Nothing here is stored, so a resumed segment cannot disagree with an unbroken run about
where it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from engine.task.definition import TaskDefinition
from engine.train.seeding import generator


@dataclass(frozen=True)
class SampleRef:
    """One use of one dataset example: which epoch, which example, which use.

    ``draw`` numbers the uses of an epoch (an example repeated 3 times has 3); the
    sample's random draws are keyed by it. Without repeats it is the example's index,
    as it always was, so such training keeps its bits.
    """

    epoch: int
    index: int
    draw: int | None = None

    @property
    def key(self) -> int:
        """What the per-sample generators are keyed by (with the epoch)."""
        return self.index if self.draw is None else self.draw


@dataclass(frozen=True)
class TrainingPlan:
    dataset_size: int
    batch_size: int
    accumulation: int
    seed: int
    max_train_steps: int | None
    max_train_epochs: int
    segment_steps: int | None
    segment_epochs: int

    @classmethod
    def for_task(cls, task: TaskDefinition, dataset_size: int) -> TrainingPlan:
        ta = task.train_args
        return cls(
            dataset_size=dataset_size,
            batch_size=ta.batch_size,
            accumulation=ta.gradient_accumulation_steps,
            seed=task.seed,
            max_train_steps=ta.max_train_steps,
            max_train_epochs=ta.max_train_epochs,
            segment_steps=ta.num_train_steps,
            segment_epochs=ta.num_train_epochs,
        )

    # -- sizes --------------------------------------------------------------------------

    @property
    def micro_batches_per_epoch(self) -> int:
        """The last micro-batch of an epoch may be short: no sample is dropped."""
        return math.ceil(self.dataset_size / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """The last optimizer step of an epoch may accumulate fewer micro-batches."""
        return math.ceil(self.micro_batches_per_epoch / self.accumulation)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole training; also the lr schedule's length."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        return self.max_train_epochs * self.steps_per_epoch

    def segment_end(self, start_step: int) -> int:
        """The global step at which a segment that starts at ``start_step`` stops."""
        steps = self.segment_steps
        if steps is None:
            steps = self.segment_epochs * self.steps_per_epoch
        return min(start_step + steps, self.total_steps)

    # -- positions ----------------------------------------------------------------------

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_in_epoch(self, step: int) -> int:
        return step % self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[SampleRef]]:
        """The samples of optimizer step ``step``, split into micro-batches."""
        epoch, k = self.epoch_of(step), self.step_in_epoch(step)
        order = _epoch_order(self.seed, epoch, self.dataset_size)
        first = k * self.accumulation
        last = min(first + self.accumulation, self.micro_batches_per_epoch)
        return [
            [SampleRef(epoch, i) for i in order[m * self.batch_size : (m + 1) * self.batch_size]]
            for m in range(first, last)
        ]


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    """The shuffled order of the dataset in one epoch, seeded by (seed, epoch)."""
    return tuple(torch.randperm(size, generator=generator(seed, "data_order", epoch)).tolist())
