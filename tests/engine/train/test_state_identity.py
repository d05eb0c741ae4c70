"""The training identity: what a checkpoint must agree with to be resumed.

A one-source task keeps its ``"dataset"`` entry exactly (its checkpoints still resume);
a task with several subsets names each with its own content hash, so a changed subset
is reported by where it is."""

from __future__ import annotations

import copy

import pytest

from engine.task.validation import validate_document
from engine.train.state import identity_differences, training_identity
from tests.support.engine import BASE_TASK, make_task


def _subsets_task(datasets: list[dict]):
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    return validate_document({**doc, "datasets": datasets})


def test_a_one_source_task_keeps_its_dataset_entry() -> None:
    task = make_task()
    identity = training_identity(task, "abc")
    assert "datasets" not in identity
    assert identity["dataset"] == {**task.dataset.stable_dump(), "content_hash": "abc"}
    assert training_identity(task, "abc", ["abc"]) == identity


def test_several_subsets_are_each_named_with_their_content_hash() -> None:
    task = _subsets_task([{"name": "loraflow/demo-shapes"},
                          {"name": "loraflow/demo-shapes", "repeats": 3}])
    identity = training_identity(task, "all", ["h0", "h1"])
    assert "dataset" not in identity
    assert [d["content_hash"] for d in identity["datasets"]] == ["h0", "h1"]
    assert identity["datasets"][1]["repeats"] == 3

    changed = training_identity(task, "all2", ["h0", "other"])
    assert identity_differences(identity, changed) == [
        '/datasets/1/content_hash: checkpoint has "h1", task has "other"']


def test_several_subsets_without_their_hashes_are_refused() -> None:
    task = _subsets_task([{"name": "a/b"}, {"name": "c/d"}])
    with pytest.raises(ValueError, match="one content hash per subset"):
        training_identity(task, "all")
