"""The validation set: prompts files and dataset files in every format read the same,
with the task's defaults filled in, and a file that cannot be used is refused by name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from engine.infer.validation_set import (
    ValidationItem,
    ValidationSetError,
    read_dataset_file,
    read_prompts_file,
    validation_items,
)
from engine.task.validation import TaskValidationError
from tests.support.engine import make_task

ROWS = [
    {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 3, "width": 64,
     "height": 32, "steps": 3, "guidance_scale": 2.0},
    {"prompt": "a blue square"},
]


def _expected(task) -> list[ValidationItem]:
    return [
        ValidationItem("a red circle", "blurry", 3, 64, 32, 3, 2.0),
        ValidationItem("a blue square", None, None, task.train_args.resolution,
                       task.train_args.resolution, task.validation.num_inference_steps,
                       task.validation.guidance_scale),
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif suffix == ".csv":
        columns = sorted({k for r in rows for k in r})
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa

        table = pa.Table.from_pylist(rows)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, path)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet", ".arrow"])
def test_every_dataset_format_gives_the_same_items(tmp_path: Path, suffix: str) -> None:
    task = make_task()
    url = str(_write(tmp_path / f"set{suffix}", ROWS))
    assert read_dataset_file(url, task) == _expected(task)


def test_size_column_and_image_relative_to_the_file(tmp_path: Path) -> None:
    task = make_task()
    url = str(_write(tmp_path / "set.jsonl", [
        {"prompt": "a", "size": "64x32", "image": "images/a.png"}, {"prompt": "b", "size": 48}]))
    a, b = read_dataset_file(url, task)
    assert (a.width, a.height, a.image) == (64, 32, str(tmp_path / "images" / "a.png"))
    assert (b.width, b.height, b.image) == (48, 48, None)


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "a", "sed": 1}, r"unknown column\(s\) \['sed'\]"),
    ({"prompt": ""}, "column 'prompt': a non-empty prompt"),
    ({"prompt": "a", "width": 30}, "column 'width': 30 is not a positive multiple of 8"),
    ({"prompt": "a", "size": "big"}, "column 'size'"),
    ({"prompt": "a", "steps": "many"}, "column 'steps': 'many' is not a number"),
    ({"prompt": "a", "image": "../secret.png"}, "column 'image'.*inside it"),
])
def test_a_bad_row_is_refused_naming_row_and_column(tmp_path: Path, row: dict,
                                                    message: str) -> None:
    url = str(_write(tmp_path / "set.jsonl", [{"prompt": "fine"}, row]))
    with pytest.raises(ValidationSetError, match=rf"set.jsonl, row 1.*{message}"):
        read_dataset_file(url, make_task())


def test_unknown_format_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationSetError, match="unknown format .txt"):
        read_dataset_file(str(tmp_path / "set.txt"), make_task())
    with pytest.raises(ValidationSetError, match="does not exist"):
        read_dataset_file(str(tmp_path / "none.csv"), make_task())
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValidationSetError, match="cannot be read as json"):
        read_dataset_file(str(tmp_path / "broken.json"), make_task())


def test_prompts_file_one_per_line_without_blanks_or_comments(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red circle\n\n  a blue square  \n")
    assert read_prompts_file(str(path)) == ["a red circle", "a blue square"]
    task = make_task(**{"validation.prompts_file": str(path)})
    items = validation_items(task, dataset=None)
    assert [i.prompt for i in items] == ["a red circle", "a blue square"]
    assert all(i.seed is None and i.width == task.train_args.resolution for i in items)
    path.write_text("\n# nothing\n")
    with pytest.raises(ValidationSetError, match="has no prompt"):
        read_prompts_file(str(path))


def test_validation_steps_needs_checkpoints_at_those_steps() -> None:
    with pytest.raises(TaskValidationError, match=r"/validation/validation_steps.*multiple of "
                       r"train_args.checkpointing_steps \(None\)"):
        make_task(**{"validation.validation_steps": 4})
    with pytest.raises(TaskValidationError, match=r"checkpointing_steps \(3\)"):
        make_task(**{"validation.validation_steps": 4, "train_args.checkpointing_steps": 3})
    with pytest.raises(TaskValidationError, match="/train_args/checkpoints_total_limit"):
        make_task(**{"validation.validation_steps": 4, "train_args.checkpointing_steps": 2,
                     "train_args.checkpoints_total_limit": 1})
    task = make_task(**{"validation.validation_steps": 4, "train_args.checkpointing_steps": 2})
    assert task.validation.validation_steps == 4


def test_one_source_of_prompts_only(tmp_path: Path) -> None:
    with pytest.raises(TaskValidationError, match="/validation/prompts_file.*not several"):
        make_task(**{"validation.prompt": "x", "validation.prompts_file": "p.txt"})


def test_unused_fields_leave_the_validation_section_as_before() -> None:
    assert set(make_task().validation.stable_dump()) == {
        "prompt", "num_images", "num_inference_steps", "guidance_scale"}
