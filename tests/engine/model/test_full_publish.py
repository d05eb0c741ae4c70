"""A full fine-tune's published model/ folder: the chosen weights, and the same bytes twice."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.model.full_publish import publish_full_run
from engine.train.ema import EMA_FILE
from engine.train.full_finetune import WEIGHTS_FILE
from tests.support.engine import make_task, run_chain

SUMMARY = {"run_name": "My Run", "global_step": 2, "started_at": "2026-01-01T00:00:00+00:00"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_full_model_holds_the_ema_weights_and_republishing_rewrites_the_same_bytes(
        tmp_path: Path) -> None:
    task = make_task(**{"training_type": "full", "train_args.learning_rate": 1e-4,
                        "train_args.max_train_steps": 2, "train_args.num_train_steps": 2,
                        "train_args.ema": {"decay": 0.5}})
    checkpoint = Path(run_chain(task, tmp_path / "run")[-1].checkpoint)

    def publish() -> dict:
        return publish_full_run(str(checkpoint), task, str(tmp_path / "out"),
                                dataset_hash="abc", validation_images=[], base_images=[],
                                metrics_url=None, run_summary=SUMMARY)

    first = publish()
    files = snapshot(Path(first["model_dir"]))
    assert publish() == first and snapshot(Path(first["model_dir"])) == files
    assert Path(first["single_file"]).name == "loraflow_my_run.safetensors"

    unet = load_file(Path(first["diffusers_model"]) / "unet" /
                     "diffusion_pytorch_model.safetensors")
    ema, raw = load_file(checkpoint / EMA_FILE), load_file(checkpoint / WEIGHTS_FILE)
    assert all(torch.equal(v, ema[f"unet.{k}"]) for k, v in unet.items())
    assert not all(torch.equal(v, raw[f"unet.{k}"]) for k, v in unet.items())
    assert "ema weights" in (Path(first["model_dir"]) / "README.md").read_text()
