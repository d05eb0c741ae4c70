"""What a run publishes holds no local path, temporary folder, ``file://`` URL or secret.

A published folder (``lora/``, or ``model/`` for a full fine-tune) is shared on its own.
Two real runs of the finetune flow (a LoRA with a new token, 2 steps in 2 segments, and
a full fine-tune, 2 steps), on a task that names only local places: the base model by
its folder, the images by their folder, a prompts file, a cache and data folder, and a
recorded override naming the images' folder. Every published file is then scanned byte
for byte (a safetensors file: its header) for the test's temporary folder, the system's
temp folder, the home folder, ``file://`` and an AWS secret set in the environment; and
the run summary still says where its checkpoints and metrics are, relative to the run.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest

from tests.support.datasets import image_folder, png
from tests.support.flow import flow_task, run_finetune

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(400)

SECRET = "wJalrXUtnFEMIexampleSECRETkey0123"  # a fake AWS secret in the run's environment
TWO_STEPS = {"train_args.num_train_steps": 1, "train_args.max_train_steps": 2,
             "train_args.batch_size": 2, "train_args.gradient_accumulation_steps": 1}
FULL = {"training_type": "full", "train_args.learning_rate": 1e-4,
        "train_args.num_train_steps": 2}
NEW_TOKEN = {"lora.new_tokens": [{"token": "<sq>", "init_words": ["square"]}]}


def _local_task(root: Path, model_folder: str, **changes: object):  # noqa: ANN202
    photos = image_folder(root / "photos", [
        (f"img{i}.png", png(32, 32, (40 * i, 90, 30)), f"a <sq> square number {i}")
        for i in range(4)
    ])
    prompts = root / "prompts.txt"
    prompts.write_text("a <sq> square\n")
    task = flow_task(**{"model.name": model_folder, "dataset": {"name": str(photos)},
                        "validation.prompts_file": str(prompts), **TWO_STEPS, **changes})
    return task, photos


def _run(root: Path, model_folder: str, **changes: object) -> Path:
    task, photos = _local_task(root, model_folder, **changes)
    run_finetune(task, str(root / "run"), cache_dir=str(root / "cache"),
                 data_dir=str(root / "data"), overrides=[f"dataset.name={photos}"])
    return root / "run"


@pytest.fixture(scope="module")
def runs(prefect_api: str, tiny_sd1: str,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run folders of the LoRA run and the full fine-tune, each in its own temp folder."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        return {
            "lora": _run(tmp_path_factory.mktemp("published-lora"), tiny_sd1, **NEW_TOKEN),
            "full": _run(tmp_path_factory.mktemp("published-full"), tiny_sd1, **FULL),
        }


def _scanned_bytes(path: Path) -> bytes:
    """What a reader of the file sees: a safetensors file's header, any other whole file."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        (size,) = struct.unpack("<Q", data[:8])
        return data[8:8 + size]
    return data


def _forbidden(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return [
        str(tmp_path_factory.getbasetemp()),  # the runs, LORAFLOW_HOME, data and caches
        str(Path(tempfile.gettempdir())) + "/",
        str(Path.home()),
        "file://",
        SECRET,
    ]


def _published(run: Path, folder: str) -> dict[str, bytes]:
    files = sorted(p for p in (run / folder).rglob("*") if p.is_file())
    return {p.relative_to(run).as_posix(): _scanned_bytes(p) for p in files}


@pytest.mark.parametrize(("kind", "folder"), [("lora", "lora"), ("full", "model")])
def test_no_published_file_holds_a_local_path_a_temp_dir_or_a_secret(
    runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, kind: str, folder: str
) -> None:
    published = _published(runs[kind], folder)
    expected = {"README.md", "task.json", "run_summary.json", "metrics.jsonl",
                "validation/00.png", "validation/base/00.png"}
    assert {f"{folder}/{name}" for name in expected} <= set(published)
    leaks = [(name, needle) for name, data in published.items()
             for needle in _forbidden(tmp_path_factory) if needle.encode() in data]
    assert not leaks, f"published files hold local paths or secrets: {leaks}"


def test_the_lora_folder_holds_both_weight_files_and_the_token_embedding(
    runs: dict[str, Path],
) -> None:
    names = set(_published(runs["lora"], "lora"))
    assert {"lora/pytorch_lora_weights.safetensors", "lora/loraflow_run.safetensors"} <= names
    assert any(n.startswith("lora/") and "sq" in n and n.endswith(".safetensors")
               for n in names), names  # the new token's textual-inversion file


@pytest.mark.parametrize(("kind", "folder", "last"), [("lora", "lora", 1), ("full", "model", 0)])
def test_the_run_summary_names_places_relative_to_the_run_folder(
    runs: dict[str, Path], kind: str, folder: str, last: int
) -> None:
    run = runs[kind]
    summary = json.loads((run / folder / "run_summary.json").read_text())
    assert "output_dir" not in summary
    assert summary["checkpoint"] == f"segments/{last:04d}/checkpoint"
    for row in summary["segment_results"]:
        assert row["checkpoint"] == f"segments/{row['index']:04d}/checkpoint"
        assert (run / row["checkpoint"] / "manifest.json").is_file()
        assert (run / row["metrics"]).is_file()
    (cache_entry,) = [p.name for p in (run.parent / "cache").iterdir()]
    assert summary["cache"]["address"] == cache_entry  # outside the run: its last part
    assert summary["overrides"] == ["dataset.name=photos"]
