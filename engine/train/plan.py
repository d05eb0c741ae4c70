"""Where training is, as a pure function of the global step.

Epoch, position in the epoch, which samples form each micro-batch, and when this
segment and the whole training end: all derived from (task, the data's layout, global
step). Nothing here is stored, so a resumed segment cannot disagree with an unbroken run
about where it is.

An epoch uses every example ``repeats(i)`` times. Its micro-batches are laid out as:
one permutation of the epoch's uses (``data_order``), partitioned by bucket keeping that
order, each bucket cut into batches of ``batch_size`` (its remainder is a smaller batch:
no image is ever dropped), and, only when there are several buckets, the batches put in
a drawn order (``batch_order``). With one bucket and no repeats that is exactly the
shuffled dataset cut into batches, as it always was, so such training keeps its bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from engine.data.buckets import Bucket
from engine.data.training_data import TrainingData
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
class EpochLayout:
    """What one epoch is made of: each example's uses per epoch and its bucket.

    ``groups[i]`` is the position of example ``i``'s bucket in ``buckets`` (the distinct
    buckets, sorted). Use ``k`` of example ``i`` (k = 0 .. repeats[i] - 1) has draw
    ``k * len(repeats) + i``: the first use of every example is keyed by its index.
    """

    repeats: tuple[int, ...]
    groups: tuple[int, ...]
    buckets: tuple[Bucket, ...]
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.repeats) != len(self.groups):
            raise ValueError("one repeat count and one bucket per example")
        object.__setattr__(self, "_hash", hash((self.repeats, self.groups, self.buckets)))

    def __hash__(self) -> int:  # computed once: the plan is hashed on every lookup
        return self._hash

    @classmethod
    def of(cls, data: TrainingData) -> EpochLayout:
        """The layout of a task's data: its repeats and each example's bucket."""
        n = len(data)
        repeats = tuple(data.repeats(i) for i in range(n))
        if all(len(s.buckets) == 1 for s in data.settings):  # no image sizes needed
            per_example = [data.settings[data.subset_of(i)].buckets[0] for i in range(n)]
        else:
            per_example = list(data.buckets)
        buckets = tuple(sorted(set(per_example)))
        position = {b: k for k, b in enumerate(buckets)}
        return cls(repeats, tuple(position[b] for b in per_example), buckets)

    @classmethod
    def uniform(cls, size: int, bucket: Bucket) -> EpochLayout:
        """``size`` examples, each used once, all in one bucket."""
        return cls((1,) * size, (0,) * size, (bucket,))

    @property
    def uses(self) -> int:
        """Uses of examples per epoch (the examples when nothing repeats)."""
        return sum(self.repeats)

    def uses_by_bucket(self) -> list[int]:
        """Uses per epoch of each bucket, in the order of ``buckets``."""
        out = [0] * len(self.buckets)
        for group, repeats in zip(self.groups, self.repeats, strict=True):
            out[group] += repeats
        return out

    @property
    def repeated(self) -> bool:
        return any(r != 1 for r in self.repeats)

    def use_list(self) -> list[tuple[int, int | None]]:
        """Every use of the epoch as (example, draw), ordered by draw."""
        n = len(self.repeats)
        if not self.repeated:
            return [(i, None) for i in range(n)]
        return [(i, k * n + i) for k in range(max(self.repeats, default=0))
                for i in range(n) if k < self.repeats[i]]


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
    layout: EpochLayout | None = None  # None: each example once, one bucket

    @classmethod
    def for_task(cls, task: TaskDefinition, data: TrainingData | int) -> TrainingPlan:
        """The plan of ``task`` over ``data`` (a bare count: each example once, one bucket)."""
        ta = task.train_args
        layout = None if isinstance(data, int) else EpochLayout.of(data)
        if layout is not None and not layout.repeated and len(layout.buckets) == 1:
            layout = None  # the same epochs, without carrying a tuple per example
        return cls(
            dataset_size=data if isinstance(data, int) else len(data),
            batch_size=ta.batch_size,
            accumulation=ta.gradient_accumulation_steps,
            seed=task.seed,
            max_train_steps=ta.max_train_steps,
            max_train_epochs=ta.max_train_epochs,
            segment_steps=ta.num_train_steps,
            segment_epochs=ta.num_train_epochs,
            layout=layout,
        )

    # -- sizes --------------------------------------------------------------------------

    @property
    def uses_per_epoch(self) -> int:
        return self.dataset_size if self.layout is None else self.layout.uses

    @property
    def micro_batches_per_epoch(self) -> int:
        """Short micro-batches (a bucket's remainder, the epoch's last) are kept: no
        sample is dropped."""
        if self.layout is None:
            return math.ceil(self.dataset_size / self.batch_size)
        return sum(math.ceil(u / self.batch_size) for u in self.layout.uses_by_bucket())

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

    def epoch_batches(self, epoch: int) -> tuple[tuple[SampleRef, ...], ...]:
        """Every micro-batch of ``epoch``, in training order (see the module docstring)."""
        return _epoch_batches(self.seed, epoch, self.dataset_size, self.batch_size, self.layout)

    def micro_batches(self, step: int) -> list[list[SampleRef]]:
        """The samples of optimizer step ``step``, split into micro-batches."""
        epoch, k = self.epoch_of(step), self.step_in_epoch(step)
        first = k * self.accumulation
        return [list(mb) for mb in self.epoch_batches(epoch)[first : first + self.accumulation]]


@lru_cache(maxsize=4)  # at least the stream's AHEAD: the epochs of its micro-batches made ahead
def _epoch_batches(seed: int, epoch: int, size: int, batch_size: int,
                   layout: EpochLayout | None) -> tuple[tuple[SampleRef, ...], ...]:
    uses = layout.use_list() if layout is not None else [(i, None) for i in range(size)]
    order = torch.randperm(len(uses), generator=generator(seed, "data_order", epoch)).tolist()
    refs = [SampleRef(epoch, *uses[u]) for u in order]
    if layout is None or len(layout.buckets) == 1:
        return _chunks(refs, batch_size)
    by_bucket: list[list[SampleRef]] = [[] for _ in layout.buckets]
    for ref in refs:
        by_bucket[layout.groups[ref.index]].append(ref)
    batches = [mb for group in by_bucket for mb in _chunks(group, batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator(seed, "batch_order", epoch))
    return tuple(batches[b] for b in shuffled.tolist())


def _chunks(refs: list[SampleRef], size: int) -> tuple[tuple[SampleRef, ...], ...]:
    return tuple(tuple(refs[k : k + size]) for k in range(0, len(refs), size))
