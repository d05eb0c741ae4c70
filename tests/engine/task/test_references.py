"""The check of what a task refers to: its dataset and its model, without loading either.

Before, ``loraflow validate`` passed documents that failed 35 s into ``run``: a missing
dataset path, an empty folder, a wrong caption column. ``validate --check-refs`` (and
``segment``, before any work) now looks: the dataset exists and has the columns, the
model folder has ``model_index.json``; every problem by JSON pointer, together.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import ExitCode
from engine.task.references import check_references, reference_problems
from engine.task.validation import TaskValidationError
from tests.support.engine import make_task

ROOT = Path(__file__).resolve().parents[3]


def _image_folder(folder: Path, rows: int = 2, caption_key: str = "text") -> Path:
    folder.mkdir(parents=True)
    lines = []
    for i in range(rows):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", caption_key: f"shape {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _pointers(problems: list) -> dict[str, str]:
    return {p.pointer: p.message for p in problems}


def test_embedded_model_and_dataset_need_nothing() -> None:
    assert reference_problems(make_task()) == []


def test_a_local_model_folder_and_image_folder_pass(tiny_sd1: str, tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data")
    task = make_task(**{"model.name": tiny_sd1, "dataset.name": str(data)})
    assert reference_problems(task) == []


def test_a_missing_dataset_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    found = _pointers(reference_problems(make_task(**{"dataset.name": str(missing)})))
    assert list(found) == ["/dataset/name"]
    assert str(missing) in found["/dataset/name"] and "no such" in found["/dataset/name"]


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    found = _pointers(reference_problems(make_task(**{"dataset.name": str(tmp_path / "empty")})))
    assert list(found) == ["/dataset/name"] and "no data files" in found["/dataset/name"]


def test_a_wrong_caption_column_lists_the_columns(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data", caption_key="caption")
    found = _pointers(reference_problems(make_task(**{"dataset.name": str(data)})))
    assert list(found) == ["/dataset/caption_column"]
    message = found["/dataset/caption_column"]
    assert "'text'" in message and "image, caption" in message


def test_a_wrong_image_column_in_a_csv_file(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("file,text\na.png,hello\n")
    task = make_task(**{"dataset.name": str(tmp_path / "rows.csv")})
    found = _pointers(reference_problems(task))
    assert list(found) == ["/dataset/image_column"] and "file, text" in found[
        "/dataset/image_column"]


def test_a_model_folder_without_model_index_is_refused(tiny_sd1: str, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(Path(tiny_sd1) / "unet", folder / "unet")
    found = _pointers(reference_problems(make_task(**{"model.name": str(folder)})))
    assert list(found) == ["/model/name"] and "model_index.json" in found["/model/name"]


def test_an_unsupported_model_family_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    found = _pointers(reference_problems(make_task(**{"model.name": str(tmp_path)})))
    assert "FluxPipeline" in found["/model/name"]


def test_offline_hub_references_are_refused_without_waiting() -> None:
    task = make_task(**{"model.name": "runwayml/stable-diffusion-v1-5",
                        "dataset.name": "lambdalabs/naruto-blip-captions"})
    started = time.monotonic()
    found = _pointers(reference_problems(task))
    assert time.monotonic() - started < 5
    assert sorted(found) == ["/dataset/name", "/model/name"]
    assert "not in the local Hugging Face cache" in found["/model/name"]
    assert all("HF_HUB_OFFLINE" in m for m in found.values())


def test_a_missing_archive_file_is_named(tmp_path: Path) -> None:
    url = (tmp_path / "gone.zip").as_uri()
    task = make_task(**{"dataset.name": None, "dataset.url": url})
    found = _pointers(reference_problems(task))
    assert list(found) == ["/dataset/url"] and "gone.zip" in found["/dataset/url"]


def test_every_problem_is_raised_together(tmp_path: Path) -> None:
    task = make_task(**{"model.name": str(tmp_path / "m"), "dataset.name": str(tmp_path / "d")})
    with pytest.raises(TaskValidationError) as info:
        check_references(task)
    assert [p.pointer for p in info.value.problems] == ["/model/name", "/dataset/name"]
    assert info.value.exit_code == ExitCode.BAD_INPUT


def test_a_prepared_copy_stands_in_for_its_source(tmp_path: Path) -> None:
    from engine.data.prepared import prepare_for_task

    data = _image_folder(tmp_path / "data")
    task = make_task(**{"dataset.name": str(data)})
    prepare_for_task(task, str(tmp_path / "prepared"))
    shutil.rmtree(data)
    assert [p.pointer for p in reference_problems(task)] == ["/dataset/name"]
    assert reference_problems(task, prepared_in=str(tmp_path / "prepared")) == []


# -- the CLI ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_validate_check_refs_lists_the_problems(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    task = tmp_path / "task.json"
    task.write_text(json.dumps({
        "model": {"name": str(tmp_path / "no-model")},
        "dataset": {"name": str(tmp_path / "empty")},
        "validation": {},
        "train_args": {},
    }))
    assert _cli("validate", str(task)).returncode == 0  # the document alone is fine
    done = _cli("validate", "--check-refs", str(task))
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "/model/name:" in done.stderr and "/dataset/name:" in done.stderr
    assert "no data files" in done.stderr and done.stdout == ""
    assert "--check-refs" in _cli("validate", "--help").stdout


def test_each_subset_is_checked_and_named_by_its_pointer(tmp_path: Path) -> None:
    import copy

    from engine.task.validation import validate_document
    from tests.support.engine import BASE_TASK

    good = _image_folder(tmp_path / "good")
    other = _image_folder(tmp_path / "other", caption_key="caption")
    missing = tmp_path / "gone"
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    doc["datasets"] = [{"name": str(good)}, {"name": str(missing)}, {"name": str(other)},
                       {"shards": [str(tmp_path / "none.tar")]}]
    found = _pointers(reference_problems(validate_document(doc)))
    assert sorted(found) == ["/datasets/1/name", "/datasets/2/caption_column",
                             "/datasets/3/shards/0"]
    assert str(missing) in found["/datasets/1/name"]
    assert "datasets.2.caption_column 'text'" in found["/datasets/2/caption_column"]
    assert "no such shard file" in found["/datasets/3/shards/0"]


def test_a_prepared_bucketed_subset_stands_in_for_its_source(tmp_path: Path) -> None:
    import copy

    from engine.data.prepared import prepare_subsets
    from engine.task.validation import validate_document
    from tests.support.engine import BASE_TASK

    data = _image_folder(tmp_path / "data")
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    doc["datasets"] = [{"name": str(data), "buckets": {"step": 16}}]
    task = validate_document(doc)
    prepare_subsets(task, str(tmp_path / "prepared"))
    shutil.rmtree(data)
    assert reference_problems(task, prepared_in=str(tmp_path / "prepared")) == []
    assert list(_pointers(reference_problems(task))) == ["/datasets/0/name"]
