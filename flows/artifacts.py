"""What a person sees of a fine-tuning run in the Prefect UI: progress, metrics, results.

Three artifacts per run, keyed by the run's name so that the Artifacts page keeps one
history per run folder:

* ``<run>-progress``: a progress bar (training steps done / total), updated as each
  segment finishes;
* ``<run>-segments``: a table, one row per segment: steps, mean loss, seconds, samples/s;
* ``<run>-result``: markdown with the validation images and where the LoRA went.
"""

from __future__ import annotations

import base64
import re
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from engine.store import storage
from tasks.payloads import PublishResult, RunSummary, SegmentSummary, ValidationResult

#: Images up to this size are inlined as data URIs (the UI cannot fetch s3:// links).
INLINE_IMAGE_BYTES = 256 * 1024


def run_key(output_dir: str) -> str:
    """An artifact key from the run folder's name: lowercase letters, digits, dashes."""
    name = storage.basename(output_dir) or "run"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "run"


def percent(done_steps: int, total_steps: int) -> float:
    return 100.0 if total_steps <= 0 else round(100.0 * done_steps / total_steps, 1)


def start_progress(output_dir: str, done_steps: int, total_steps: int) -> UUID:
    return create_progress_artifact(
        percent(done_steps, total_steps),
        key=f"{run_key(output_dir)}-progress",
        description=f"Training steps done of {total_steps}",
    )


def show_progress(artifact_id: UUID, done_steps: int, total_steps: int) -> None:
    update_progress_artifact(
        artifact_id, percent(done_steps, total_steps),
        description=f"{done_steps} of {total_steps} training steps done",
    )


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def segment_rows(segments: list[SegmentSummary]) -> list[dict]:
    """One table row per segment (plain numbers, so the UI can sort them)."""
    return [
        {
            "segment": s.index,
            "steps": f"{s.result.start_step}-{s.result.global_step}",
            "loss": _round(s.loss, 5),
            "seconds": _round(s.result.seconds, 1),
            "samples/s": _round(s.samples_per_second, 2),
            "stopped by": s.result.stopped_by.value,
        }
        for s in segments
    ]


def show_segments(output_dir: str, segments: list[SegmentSummary]) -> UUID:
    return create_table_artifact(
        segment_rows(segments),
        key=f"{run_key(output_dir)}-segments",
        description="Per-segment training metrics (loss: mean over the segment's steps)",
    )


def _image_markdown(url: str, caption: str) -> str:
    """Inline a small PNG as a data URI; link a large one (or one that cannot be read)."""
    try:
        data = storage.read_bytes(url)
    except OSError:
        return f"- [{caption}]({url})"
    if len(data) > INLINE_IMAGE_BYTES:
        return f"- [{caption}]({url})"
    encoded = base64.b64encode(data).decode("ascii")
    return f"![{caption}](data:image/png;base64,{encoded})"


def show_result(summary: RunSummary, published: PublishResult,
                validation: ValidationResult) -> UUID:
    images = validation.images
    lines = [
        f"# LoRA published: {storage.redact(published.lora_dir)}",
        "",
        f"- global step: **{summary.global_step}** of {summary.total_steps}, "
        f"{summary.segments} segment(s)",
        f"- final checkpoint: `{storage.redact(summary.checkpoint)}`",
    ]
    for label in ("diffusers", "kohya", "readme", "metrics"):
        url = getattr(published, label)
        if url:
            lines.append(f"- {label}: `{storage.redact(url)}`")
    lines += ["", "## Validation images (final checkpoint)", ""]
    lines += [
        _image_markdown(url, storage.basename(url)) + "\n" for url in images
    ] or ["(none)"]
    lines += ["", "Image files:", ""] + [f"- `{storage.redact(u)}`" for u in images]
    return create_markdown_artifact(
        "\n".join(lines),
        key=f"{run_key(summary.output_dir)}-result",
        description="Validation images and where the LoRA was published",
    )
