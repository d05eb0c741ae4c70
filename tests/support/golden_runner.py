"""How the golden check drives the engine: the only part that follows its API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.data.prepared import load_dataset_for_task
from engine.lora.publish import publish_lora
from engine.task.validation import validate_document
from engine.train.segment import SegmentOptions, run_segment


def run_golden_task(document: dict[str, Any], root: Path) -> Path:
    """Segments until FINISH (cache on, validation on), then publish into ``root``."""
    task = validate_document(document)
    checkpoint = None
    validation: list[str] = []
    for index in range(10):
        opts = SegmentOptions(checkpoint=checkpoint, cache_root=str(root / "cache"))
        result = run_segment(task, str(root / "segments" / f"{index:04d}"), opts)
        checkpoint = result.checkpoint
        validation = result.validation
        if result.finished:
            break
    data = load_dataset_for_task(task, None)
    captions = [(data.captions(i) or [""])[0] for i in range(len(data))]
    from tests.support.golden import RUN_SUMMARY

    publish_lora(
        checkpoint, task, str(root / "out"),
        dataset_hash=data.content_hash if hasattr(data, "content_hash") else "golden",
        captions=captions, validation_images=validation, metrics_url=None,
        run_summary=dict(RUN_SUMMARY),
    )
    (root / "cache").exists()
    return root
