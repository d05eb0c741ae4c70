"""A full fine-tune (``training_type: "full"``) through ``loraflow run`` and the real flow.

4 steps in 2 segments of 2, validation every 2 steps: the final validation renders with
the trained UNet, publishing writes ``model/`` (a diffusers folder and a single-file
checkpoint, no LoRA file anywhere), the run summary, the CLI and the Prefect UI say it
was a full fine-tune, and the 2 segments train exactly the UNet one engine run trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.train.full_finetune import WEIGHTS_FILE
from flows.cli.main import main
from tests.support.engine import run_chain
from tests.support.flow import artifacts, flow_task, subprocess_env

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(600)

FULL = {"training_type": "full", "train_args.learning_rate": 1e-4,
        "train_args.max_train_steps": 4}


def full_task(**changes: object):  # noqa: ANN201 - a TaskDefinition
    return flow_task(**{**FULL, "train_args.num_train_steps": 2,
                        "train_args.checkpointing_steps": 2, "validation.validation_steps": 2,
                        **changes})


@pytest.fixture(scope="module")
def full_run(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``loraflow run`` of the full task in a new process, against the session's server."""
    root = tmp_path_factory.mktemp("full")
    task_file = root / "task.json"
    task_file.write_text(full_task().model_dump_json(exclude_unset=True))
    out = root / "run"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(task_file), "--output-dir", str(out),
         "--cache-dir", str(root / "cache"), "-q"],
        env=subprocess_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {"root": root, "out": out, "stdout": done.stdout}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The engine's own single segment of the same 4 steps: its final checkpoint."""
    root = tmp_path_factory.mktemp("full-single")
    (result,) = run_chain(full_task(**{"train_args.num_train_steps": 4}), root)
    return result.checkpoint


def test_full_run_publishes_the_model_folder_and_single_file_not_a_lora(full_run: dict) -> None:
    out = full_run["out"]
    model = out / "model"
    assert f"Full fine-tune published to {model}" in full_run["stdout"]
    assert (model / "diffusers" / "model_index.json").is_file()
    assert (model / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (model / "loraflow_run.safetensors").is_file()
    for name in ("README.md", "task.json", "run_summary.json", "metrics.jsonl",
                 "validation/00.png", "validation/base/00.png"):
        assert (model / name).is_file(), name
    assert not (out / "lora").exists()
    assert not [p for p in out.rglob("*lora*") if p.name != "loraflow_run.safetensors"]

    summary = json.loads((model / "run_summary.json").read_text())
    assert summary["training_type"] == "full"
    assert summary["published"] == {"diffusers_model": "diffusers/",
                                    "single_file": "loraflow_run.safetensors"}
    assert summary["global_step"] == 4 and summary["segments"] == 2
    card = (model / "README.md").read_text()
    assert "full fine-tune" in card.lower() and "loraflow_run.safetensors" in card
    assert str(full_run["root"]) not in card + (model / "task.json").read_text()


def test_flow_of_two_segments_trains_the_single_run_unet_bitwise(
    full_run: dict, single_run: str
) -> None:
    from diffusers import StableDiffusionPipeline

    final = full_run["out"] / "segments" / "0001" / "checkpoint"
    expected = load_file(Path(single_run) / WEIGHTS_FILE)
    assert (final / WEIGHTS_FILE).read_bytes() == (Path(single_run) / WEIGHTS_FILE).read_bytes()
    assert (final / "optimizer.safetensors").read_bytes() == \
        (Path(single_run) / "optimizer.safetensors").read_bytes()

    model = full_run["out"] / "model"
    published = load_file(model / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    assert sorted(f"unet.{k}" for k in published) == sorted(expected)
    assert all(torch.equal(v, expected[f"unet.{k}"]) for k, v in published.items())
    single = StableDiffusionPipeline.from_single_file(
        str(model / "loraflow_run.safetensors"), config=str(model / "diffusers"),
        local_files_only=True, safety_checker=None, requires_safety_checker=False,
    ).unet.state_dict()
    assert all(torch.equal(v, expected[f"unet.{k}"]) for k, v in single.items())


def test_final_validation_renders_with_the_trained_unet(
    full_run: dict, single_run: str, tmp_path: Path
) -> None:
    """The flow's images are the ones the single run's trained weights draw, and differ
    from the base model's (same prompt, same seed)."""
    from engine.data.prepared import load_dataset_for_task
    from engine.infer.validation import validate_full_checkpoint

    out = full_run["out"]
    task = full_task()
    data = load_dataset_for_task(task, None)
    mine = validate_full_checkpoint(task, single_run, str(tmp_path), data)
    flow_image = (out / "validation" / "00.png").read_bytes()
    assert Path(mine.lora[0]).read_bytes() == flow_image
    assert Path(mine.base[0]).read_bytes() == (out / "validation" / "base" / "00.png").read_bytes()
    assert flow_image != (out / "validation" / "base" / "00.png").read_bytes()
    assert (out / "model" / "validation" / "00.png").read_bytes() == flow_image


def test_validation_steps_of_a_full_run_render_the_trained_weights(full_run: dict) -> None:
    folders = full_run["out"] / "validation"
    losses = []
    for step in (2, 4):
        record = json.loads((folders / f"step-{step}" / "loss.json").read_text())
        assert (folders / f"step-{step}" / "00.png").read_bytes()[:4] == b"\x89PNG"
        losses.append(record["loss"])
    assert losses[0] != losses[1], "each step's trained weights give their own loss"


def test_ui_says_it_was_a_full_fine_tune_and_names_the_files(full_run: dict) -> None:
    from flows.artifacts import run_key

    out = full_run["out"]
    summary = json.loads((out / "model" / "run_summary.json").read_text())
    found = artifacts(summary["flow_run_id"])
    (result, *_) = [a for a in found if a.key == f"{run_key(str(out))}-result"]
    text = str(result.data)
    assert text.startswith(f"# Full fine-tune published: {out / 'model'}")
    assert "single_file: `" in text and "loraflow_run.safetensors" in text
    assert f"diffusers_model: `{out / 'model' / 'diffusers'}`" in text
    assert "kohya" not in text and "LoRA" not in text


@pytest.mark.parametrize("override, pointer", [
    ('output.lora_formats=["kohya"]', "/output/lora_formats"),
    ("lora.type=dora", "/lora/type"),
    ('lora.text_encoder={"rank": 4}', "full_finetune.train_text_encoder"),
])
def test_lora_only_options_of_a_full_run_are_refused_before_it_starts(
    override: str, pointer: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_file = tmp_path / "task.json"
    task_file.write_text(full_task().model_dump_json(exclude_unset=True))
    code = main(["run", str(task_file), override, "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert pointer in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
