"""``loraflow caption``: prepare, caption, summarise; the editable copy trains back."""

from __future__ import annotations

import json
from pathlib import Path

from flows.cli.main import main
from tests.support.datasets import png

CAPTIONING = {"backend": "transformers", "model": "loraflow/tiny-captioner", "max_length": 6,
              "trigger": "sks", "caption_template": "{trigger} shape, {caption}"}


def task_file(tmp_path: Path, **changes) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(3):
        (photos / f"p{i}.png").write_bytes(png(32, 32, color=(80 * i, 40, 200 - 60 * i)))
    doc = {
        "model": {"name": "loraflow/tiny-sd1"},
        "dataset": {"name": str(photos)},
        "validation": {"num_images": 1, "num_inference_steps": 2},
        "train_args": {"resolution": 32, "batch_size": 1, "max_train_steps": 2,
                       "num_train_steps": 2},
        "captioning": CAPTIONING,
        **changes,
    }
    path = tmp_path / "task.json"
    path.write_text(json.dumps(doc))
    return path


def run(tmp_path: Path, *argv: str, capsys) -> tuple[int, str, str]:
    code = main(["caption", *argv, "--data-dir", str(tmp_path / "data"), "-q"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_caption_captions_an_uncaptioned_folder_and_a_rerun_captions_nothing(tmp_path, capsys):
    task = str(task_file(tmp_path))
    code, out, _ = run(tmp_path, task, capsys=capsys)
    assert code == 0
    first = json.loads(out)
    assert (first["captioned"], first["from_cache"]) == (3, 0)
    pairs = first["subsets"]["0"]["pairs"]
    assert all(p["caption"].startswith("sks shape, ") for p in pairs)
    code, out, _ = run(tmp_path, task, capsys=capsys)
    again = json.loads(out)
    assert (again["captioned"], again["from_cache"]) == (0, 3)
    assert again["subsets"]["0"]["address"] == first["subsets"]["0"]["address"]


def test_the_output_folder_is_a_dataset_a_task_trains_from(tmp_path, capsys):
    task = str(task_file(tmp_path))
    code, out, _ = run(tmp_path, task, "--output", str(tmp_path / "edit"), capsys=capsys)
    assert code == 0 and json.loads(out)["output"] == str(tmp_path / "edit/metadata.jsonl")
    metadata = tmp_path / "edit/metadata.jsonl"
    lines = [json.loads(x) for x in metadata.read_text().splitlines()]
    lines[0]["text"] = "sks shape, edited by hand"
    metadata.write_text("".join(json.dumps(x) + "\n" for x in lines))
    edited = task_file(tmp_path, dataset={"name": str(tmp_path / "edit")})
    doc = json.loads(edited.read_text())
    del doc["captioning"]
    edited.write_text(json.dumps(doc))
    code = main(["segment", str(edited), "--output-dir", str(tmp_path / "run"),
                 "--data-dir", str(tmp_path / "data"), "--no-validation", "-q"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] is True


def test_a_task_without_captioning_is_bad_input(tmp_path, capsys):
    doc = json.loads(task_file(tmp_path).read_text())
    del doc["captioning"]
    (tmp_path / "plain.json").write_text(json.dumps(doc))
    code, _, err = run(tmp_path, str(tmp_path / "plain.json"), capsys=capsys)
    assert code == 2 and "no 'captioning' section" in err


def test_a_missing_captioning_model_is_bad_input_naming_it(tmp_path, capsys):
    task = str(task_file(tmp_path))
    code, _, err = run(tmp_path, task, "captioning.model=nobody/missing", capsys=capsys)
    assert code == 2 and "captioning model 'nobody/missing'" in err
