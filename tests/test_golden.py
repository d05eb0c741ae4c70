"""Same task, same bytes: the files of three fixed trainings match the recorded hashes.

``tests/data/golden.json`` was recorded by ``python -m tests.support.golden``, once per kind
of machine (the same code gives other bits on another CPU: see tests/support/golden.py); a
run passes when every file equals the record of one machine. A change that moves any bit
of a checkpoint, validation image or published file fails here. Regenerate the record
only for a change that is meant to change results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.golden import (
    MATCHED,
    TASKS,
    hash_tree,
    machine_kind,
    matching_record,
    recorded,
    train_and_publish,
)

RECORDS = recorded()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_training_gives_the_recorded_bytes(name: str, tmp_path: Path) -> None:
    got = hash_tree(train_and_publish(name, tmp_path / name))
    machine, difference = matching_record(name, got, RECORDS)
    MATCHED[name] = machine
    assert machine is not None, (
        f"no golden record matches this run of {name} on {machine_kind()}; closest, "
        f"{difference}. Recorded machines: {[r['machine'] for r in RECORDS]}")


def test_a_run_matches_a_record_only_when_every_file_is_equal() -> None:
    records = [{"machine": "a", "tasks": {"t": {"x": {"sha256": "1"}, "y": {"sha256": "2"}}}},
               {"machine": "b", "tasks": {"t": {"x": {"sha256": "3"}, "y": {"sha256": "2"}}}}]
    assert matching_record("t", {"x": {"sha256": "3"}, "y": {"sha256": "2"}}, records)[0] == "b"
    machine, difference = matching_record("t", {"x": {"sha256": "1"}, "y": {"sha256": "9"}},
                                          records)
    assert machine is None and difference == "a: files differ: ['y']"
    machine, difference = matching_record("t", {"x": {"sha256": "1"}}, records)
    assert machine is None and "missing ['y']" in difference
