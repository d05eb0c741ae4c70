"""Trained and published LyCORIS files on the tiny models, for the inspect / generate tests:
a short training of each adapter type (UNet and text encoder), published as users get it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.lora.publish import publish_lora
from engine.task.definition import TaskDefinition
from tests.support.engine import make_task, run_chain

SDXL = {"model.name": "loraflow/tiny-sdxl"}
#: Two new tokens (one of two vectors), bundled into the kohya file when published.
NEW_TOKENS = {
    "lora.new_tokens": [
        {"token": "<sks>", "init_words": ["red"], "learning_rate": 5e-2},
        {"token": "<ohw>", "init_pattern": "^ci", "num_vectors": 2},
    ],
    "dataset.captions": {"prefix": "<sks> <ohw>, "},
}


@dataclass(frozen=True)
class Published:
    task: TaskDefinition
    checkpoint: str  # the last committed checkpoint folder
    files: dict  # publish_lora's URLs: "kohya", "diffusers", "embedding:<token>", ...


def published(root: Path, kind: str, **changes: object) -> Published:
    """Train ``kind`` (lora, loha, lokr, dora) for 2 steps and publish it under ``root``."""
    task = make_task(**{
        "lora.type": kind, "lora.init_lora_weights": True, "lora.text_encoder": {},
        "train_args.max_train_steps": 2, "train_args.num_train_steps": 2, **changes,
    })
    result = run_chain(task, root / "run")[-1]
    files = publish_lora(result.checkpoint, task, str(root / "out"), dataset_hash="d" * 64,
                         captions=[], validation_images=[], metrics_url=None,
                         run_summary={"run_name": kind})
    return Published(task, result.checkpoint, files)
