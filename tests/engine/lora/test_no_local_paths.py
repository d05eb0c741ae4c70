"""Published and checkpointed LoRA files hold no local path, so equal training gives equal bytes.

A network that compares file hashes (and a user who shares a file) relies on the files
depending only on the training: not on where ``LORAFLOW_HOME`` or the run folder is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.golden import train_and_publish


def _lora_files(run: Path) -> dict[str, bytes]:
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in sorted(run.rglob("*.safetensors"))
        if "cache" not in p.relative_to(run).parts
    }


def test_same_training_under_two_homes_gives_identical_lora_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = []
    for name in ("home-a", "home-b"):
        monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / name))
        runs.append(train_and_publish("tiny-sdxl-te", tmp_path / f"run-{name}"))
    first, second = (_lora_files(run) for run in runs)
    assert sorted(first) == sorted(second)
    assert "out/lora/pytorch_lora_weights.safetensors" in first
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"bytes depend on LORAFLOW_HOME: {differing}"
    for name, data in first.items():
        assert str(tmp_path).encode() not in data, f"{name} holds a local path"


def test_component_override_paths_are_published_by_their_last_part_only() -> None:
    from engine.lora.metadata import public_task_dict
    from tests.support.engine import make_task

    task = make_task(**{"model.unet": "/home/alice/models/my-unet",
                        "model.tokenizer": "/home/alice/models/tok"})
    model = public_task_dict(task)["model"]
    assert (model["unet"], model["tokenizer"]) == ("my-unet", "tok")
