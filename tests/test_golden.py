"""Same task, same bytes: the files of three fixed trainings match the recorded hashes.

``tests/data/golden.json`` was recorded by ``python -m tests.support.golden --write``;
a change that moves any bit of a checkpoint, validation image or published file fails
here. Regenerate the record only for a change that is meant to change results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.golden import GOLDEN_FILE, TASKS, hash_tree, train_and_publish

RECORDED = json.loads(GOLDEN_FILE.read_text())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_training_gives_the_recorded_bytes(name: str, tmp_path: Path) -> None:
    got = hash_tree(train_and_publish(name, tmp_path / name))
    want = RECORDED[name]
    assert sorted(got) == sorted(want), "a run writes other files than recorded"
    moved = {path: (want[path], got[path]) for path in want if got[path] != want[path]}
    assert not moved, f"files differ from the golden record: {sorted(moved)}"
