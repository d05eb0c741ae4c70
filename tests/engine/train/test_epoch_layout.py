"""The epoch layout: every use of every example once per epoch, one bucket per
micro-batch, no image dropped, a pure function of (seed, epoch), today's order kept
when there is one bucket and no repeats."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import torch

from engine.data.buckets import Bucket
from engine.data.layout import open_dataset
from engine.data.training_data import SubsetSettings, TrainingData
from engine.task.definition import DatasetArgs, TaskDefinition
from engine.task.validation import validate_document
from engine.train.plan import EpochLayout, SampleRef, TrainingPlan
from engine.train.seeding import generator
from tests.support.datasets import image_folder, png, prepare
from tests.support.engine import BASE_TASK, make_task

TALL, SQUARE, WIDE = Bucket(48, 80), Bucket(64, 64), Bucket(80, 48)


def subsets_task(datasets: list[dict], **train_args: object) -> TaskDefinition:
    """BASE_TASK with ``datasets`` (several subsets) instead of its ``dataset``."""
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    doc["datasets"] = datasets
    doc["train_args"].update(train_args)
    return validate_document(doc)


def plan(layout: EpochLayout | None, size: int, batch: int = 3, accumulation: int = 2,
         seed: int = 3) -> TrainingPlan:
    return TrainingPlan(size, batch, accumulation, seed, max_train_steps=None,
                        max_train_epochs=2, segment_steps=None, segment_epochs=1, layout=layout)


def epoch_refs(p: TrainingPlan, epoch: int) -> list[list[SampleRef]]:
    steps = range(epoch * p.steps_per_epoch, (epoch + 1) * p.steps_per_epoch)
    return [mb for s in steps for mb in p.micro_batches(s)]


def mixed_layout() -> EpochLayout:
    """10 examples in three buckets (5, 4, 1 examples), examples 0 and 7 repeated."""
    groups = (0, 1, 1, 0, 2, 0, 1, 0, 1, 0)
    repeats = (2, 1, 1, 1, 1, 1, 1, 3, 1, 1)
    return EpochLayout(repeats, groups, (TALL, SQUARE, WIDE))


def test_one_bucket_without_repeats_keeps_the_old_shuffled_order():
    size = 11
    old = torch.randperm(size, generator=generator(3, "data_order", 1)).tolist()
    for layout in (None, EpochLayout.uniform(size, SQUARE)):
        p = plan(layout, size)
        got = [r for mb in epoch_refs(p, 1) for r in mb]
        assert [r.index for r in got] == old
        assert all(r.draw is None and r.key == r.index for r in got)
        assert [len(mb) for mb in epoch_refs(p, 1)] == [3, 3, 3, 2]


def test_an_epoch_uses_each_example_its_repeats_times_with_distinct_draws():
    layout = mixed_layout()
    p = plan(layout, 10)
    for epoch in range(2):
        refs = [r for mb in epoch_refs(p, epoch) for r in mb]
        assert Counter(r.index for r in refs) == dict(enumerate(layout.repeats))
        assert len({r.key for r in refs}) == len(refs) == layout.uses == 13
        assert {r.epoch for r in refs} == {epoch}
        first_uses = {r.index: r.key for r in refs if r.key < 10}
        assert first_uses == {i: i for i in range(10)}  # use 0 of example i is keyed by i


def test_a_micro_batch_holds_one_bucket_and_only_remainders_are_short():
    layout = mixed_layout()
    p = plan(layout, 10)
    batches = epoch_refs(p, 0)
    per_bucket = Counter()
    for mb in batches:
        buckets = {layout.groups[r.index] for r in mb}
        assert len(buckets) == 1
        per_bucket[buckets.pop()] += 1
    # uses per bucket: 8 (tall), 4 (square), 1 (wide) -> batches of 3: 3 + 2 + 1
    assert layout.uses_by_bucket() == [8, 4, 1]
    assert dict(per_bucket) == {0: 3, 1: 2, 2: 1}
    assert p.micro_batches_per_epoch == len(batches) == 6
    assert p.steps_per_epoch == 3
    assert sorted(len(mb) for mb in batches) == [1, 1, 2, 3, 3, 3]


def test_the_layout_is_a_function_of_seed_and_epoch_only():
    layout = mixed_layout()
    first = epoch_refs(plan(layout, 10), 0)
    assert epoch_refs(plan(mixed_layout(), 10), 0) == first  # rebuilt, not remembered
    assert epoch_refs(plan(layout, 10), 1) != first
    assert epoch_refs(plan(layout, 10, seed=4), 0) != first


def test_batch_size_and_accumulation_do_not_change_which_uses_an_epoch_has():
    layout = mixed_layout()
    a = sorted((r.index, r.key) for mb in epoch_refs(plan(layout, 10, 2, 1), 0) for r in mb)
    b = sorted((r.index, r.key) for mb in epoch_refs(plan(layout, 10, 4, 3), 0) for r in mb)
    assert a == b


def test_the_layout_of_prepared_data_follows_its_shapes_and_repeats(tmp_path: Path):
    folder = image_folder(tmp_path / "src", [
        ("tall.png", png(30, 50), "tall"), ("square.png", png(40, 40), "square"),
        ("wide.png", png(50, 30), "wide"), ("wide2.png", png(100, 60), "wide too"),
    ])
    task = subsets_task([{"name": str(folder), "repeats": 2},
                         {"name": str(folder), "resolution": 32}], buckets={"step": 16})
    parts = [prepare(args, tmp_path / f"p{k}", tmp_path) for k, args in enumerate(task.subsets)]
    data = TrainingData([open_dataset(m.address) for m in parts],
                        [SubsetSettings.of(a, task.train_args) for a in task.subsets])
    layout = EpochLayout.of(data)
    assert layout.repeats == (2, 2, 2, 2, 1, 1, 1, 1)
    assert [layout.buckets[g] for g in layout.groups] == data.buckets
    p = TrainingPlan.for_task(task, data)
    assert p.layout == layout and p.uses_per_epoch == 12
    assert TrainingPlan.for_task(make_task(), 24).layout is None


def test_a_plan_for_data_without_buckets_or_repeats_carries_no_layout(tmp_path: Path):
    folder = image_folder(tmp_path / "src", [("a.png", png(30, 50), "a"),
                                             ("b.png", png(50, 30), "b")])
    task = make_task(**{"dataset.name": str(folder)})
    manifest = prepare(DatasetArgs(name=str(folder)), tmp_path / "p", tmp_path)
    data = TrainingData([open_dataset(manifest.address)],
                        [SubsetSettings.of(task.subsets[0], task.train_args)])
    assert TrainingPlan.for_task(task, data) == TrainingPlan.for_task(task, 2)
