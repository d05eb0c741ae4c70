"""What a person sees of a fine-tuning run in the Prefect UI: progress, metrics, results.

Five artifacts per run (seven with ``validation_steps``), keyed by the run folder
(:func:`run_key`) so that the Artifacts page keeps one history per run folder:

* ``<run>-data``: a table of what one epoch trains, one row per bucket (images, uses per
  epoch, batches) and a total; subsets and skipped files in its description. Made
  once the data is prepared, before any step;
* ``<run>-progress``: a progress bar (training steps done / total), moved every few
  seconds while a segment trains (``tasks.progress``) and after each segment;
* ``<run>-segments``: a table, one row per segment: steps, mean loss, seconds, samples/s;
* ``<run>-curve``: a chart of the loss and learning rate by step, after each segment;
* ``<run>-result``: markdown with the validation images and where the LoRA went;
* ``<run>-validation-grid`` and ``<run>-validation-loss`` (with ``validation_steps``): the
  images of each validated step, raw and EMA side by side, and a table of the held-out loss.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from engine.data.epoch_summary import EpochSummary
from engine.store import storage
from flows.charts import MEAN_WINDOW, moving_mean, training_chart
from flows.run_names import slug
from tasks.payloads import PublishResult, RunSummary, SegmentSummary, ValidationResult
from tasks.progress import percent

#: Images up to this size are inlined as data URIs (the UI cannot fetch s3:// links).
INLINE_IMAGE_BYTES = 256 * 1024
#: Longest side of a validation image's inline thumbnail; the full file is linked.
THUMBNAIL_PIXELS = 256


def run_key(output_dir: str) -> str:
    """An artifact key for a run folder: its name and 8 hex digits of its full location.

    Lowercase letters, digits and dashes (what Prefect accepts). The name alone made two
    runs into different parents named ``quickstart/`` share keys, and so one history.
    """
    name = slug(storage.basename(output_dir))[:39].strip("-") or "run"
    digest = hashlib.sha256(storage.redact(output_dir).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


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


def data_rows(epoch: EpochSummary) -> list[dict]:
    """One row per bucket of an epoch, then the total (plain numbers: the UI sorts them)."""
    rows = [{"bucket": b.bucket, "images": b.images, "uses per epoch": b.uses,
             "batches": b.batches} for b in epoch.buckets]
    rows.append({"bucket": "all", "images": epoch.images,
                 "uses per epoch": epoch.images_per_epoch, "batches": epoch.batches_per_epoch})
    return rows


def data_description(epoch: EpochSummary) -> str:
    """The table's caption: images per epoch, each subset, and what was skipped, why."""
    text = (f"One epoch: {epoch.images} images, {epoch.images_per_epoch} uses (images x "
            f"repeats) in {epoch.batches_per_epoch} batches of up to {epoch.batch_size}, "
            "each batch one bucket.")
    if len(epoch.subsets) > 1:
        text += " Subsets: " + "; ".join(
            f"{s.name}: {s.images} images x{s.repeats} = {s.uses}" for s in epoch.subsets
        ) + "."
    if epoch.skipped:
        shown = ", ".join(f"{s.get('file', s.get('index'))} ({s.get('reason')})"
                          for s in epoch.skipped_examples[:5])
        text += f" Skipped {epoch.skipped} file(s): {shown}."
    return text


def show_data(output_dir: str, epoch: EpochSummary) -> UUID:
    return create_table_artifact(
        data_rows(epoch), key=f"{run_key(output_dir)}-data", description=data_description(epoch),
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


def training_curve(segments: list[SegmentSummary]) -> tuple[list[int], list[float], list[float]]:
    """(steps, losses, learning rates) of every step trained so far, from the segments'
    ``metrics.jsonl``; a step is counted once. A file that cannot be read is left out:
    the chart is for people, and the run must not fail over it."""
    by_step: dict[int, dict] = {}
    for segment in segments:
        if not segment.result.metrics:
            continue
        try:
            lines = storage.read_bytes(segment.result.metrics).splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError):
            continue
        for record in records:
            by_step.setdefault(int(record["global_step"]), record)
    steps = sorted(by_step)
    return (steps, [float(by_step[s]["loss"]) for s in steps],
            [float(by_step[s]["lr"]) for s in steps])


def show_curve(output_dir: str, segments: list[SegmentSummary]) -> UUID | None:
    """The loss / lr chart of the run so far (a PNG inline in markdown); None if no steps."""
    steps, losses, lrs = training_curve(segments)
    if not steps:
        return None
    chart = base64.b64encode(training_chart(steps, losses, lrs)).decode("ascii")
    total = segments[-1].result.total_steps
    lines = [
        f"# Training curve: steps {steps[0]}-{steps[-1]} of {total}",
        "",
        f"![loss and learning rate by step](data:image/png;base64,{chart})",
        "",
        f"- last loss: **{losses[-1]:.4f}** (mean of the last {min(MEAN_WINDOW, len(steps))} "
        f"steps: {moving_mean(losses)[-1]:.4f})",
        f"- learning rate: {lrs[-1]:.3e}",
    ]
    return create_markdown_artifact(
        "\n".join(lines),
        key=f"{run_key(output_dir)}-curve",
        description="Loss and learning rate by step, updated after each segment",
    )


def thumbnail_png(data: bytes, pixels: int = THUMBNAIL_PIXELS) -> bytes | None:
    """A PNG of at most ``pixels`` a side (the image itself if it already is one and is
    small enough to inline); None if ``data`` is not an image Pillow can read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if max(image.size) <= pixels and image.format == "PNG" \
                    and len(data) <= INLINE_IMAGE_BYTES:
                return data
            small = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    small.thumbnail((pixels, pixels), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def image_markdown(url: str, caption: str) -> str:
    """A thumbnail inlined as a data URI (the UI cannot fetch s3:// or local links), whatever
    the image's size; a link where the image cannot be read at all."""
    try:
        data = storage.read_bytes(url)
    except OSError:
        data = b""
    thumbnail = thumbnail_png(data) if data else None
    if thumbnail is None or len(thumbnail) > INLINE_IMAGE_BYTES:
        return f"- [{caption}]({storage.redact(url)})"
    encoded = base64.b64encode(thumbnail).decode("ascii")
    return f"![{caption}](data:image/png;base64,{encoded})"


def base_vs_lora_lines(validation: ValidationResult, trained: str = "LoRA") -> list[str]:
    """A table of the base model's and the LoRA's (``trained``'s) image for each prompt
    and seed."""
    pairs = list(zip(validation.base_images, validation.images, strict=False))
    if not pairs:
        return []
    lines = ["", f"## Base model vs {trained} (same prompts and seeds)", "",
             f"| image | base model | with the {trained} |", "| --- | --- | --- |"]
    for i, (base, lora) in enumerate(pairs):
        lines.append(f"| {i} | {image_markdown(base, f'base {i}').removeprefix('- ')} "
                     f"| {image_markdown(lora, f'{trained} {i}').removeprefix('- ')} |")
    return lines


def show_result(summary: RunSummary, published: PublishResult,
                validation: ValidationResult) -> UUID:
    images = validation.images
    full = published.training_type == "full"  # a whole model: no LoRA files
    lines = [
        f"# {'Full fine-tune' if full else 'LoRA'} published: "
        f"{storage.redact(published.folder)}",
        "",
        f"- global step: **{summary.global_step}** of {summary.total_steps}, "
        f"{summary.segments} segment(s)",
        f"- final checkpoint: `{storage.redact(summary.checkpoint)}`",
    ]
    labels = ("diffusers_model", "single_file") if full else ("diffusers", "kohya")
    for label in (*labels, "readme", "metrics"):
        url = getattr(published, label)
        if url:
            lines.append(f"- {label}: `{storage.redact(url)}`")
    lines += ["", "## Validation images (final checkpoint)", ""]
    if images:
        lines += [f"Thumbnails (at most {THUMBNAIL_PIXELS} px a side); the full-size files "
                  "are listed below.", ""]
    lines += [
        image_markdown(url, storage.basename(url)) + "\n" for url in images
    ] or ["(none)"]
    lines += ["", "Image files (full size):", ""] + [f"- `{storage.redact(u)}`" for u in images]
    lines += base_vs_lora_lines(validation, "full fine-tune" if full else "LoRA")
    return create_markdown_artifact(
        "\n".join(lines),
        key=f"{run_key(summary.output_dir)}-result",
        description="Validation images and where the "
        f"{'full fine-tune' if full else 'LoRA'} was published",
    )


# -- validation every N steps (validation.validation_steps) ----------------------------


def validation_grid_lines(done: list) -> list[str]:
    """Markdown: per validated step, a row of thumbnails per adapter (raw, then EMA)."""
    lines = ["# Validation by step", ""]
    for v in done:
        losses = ", ".join(f"{name} {loss:.5f}" for name, loss in v.loss.items())
        lines += [f"## Step {v.global_step}: held-out loss {losses}", ""]
        count = max(len(urls) for urls in v.images.values())
        lines.append("| adapter | " + " | ".join(str(i) for i in range(count)) + " |")
        lines.append("| --- " * (count + 1) + "|")
        for name, urls in v.images.items():
            cells = [image_markdown(u, f"step {v.global_step} {name} {i}").removeprefix("- ")
                     for i, u in enumerate(urls)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Prompts: " + "; ".join(f"{i}: {p}" for i, p in enumerate(v.prompts)),
                  f"Folder: `{storage.redact(v.folder)}`", ""]
    return lines


def validation_loss_rows(done: list) -> list[dict]:
    """One row per validated step: the held-out loss of each adapter (plain numbers)."""
    names = sorted({name for v in done for name in v.loss}, key=lambda n: (n != "raw", n))
    return [{"step": v.global_step,
             **{f"loss ({name})": _round(v.loss.get(name), 6) for name in names},
             "held-out set": v.source, "images": sum(len(u) for u in v.images.values())}
            for v in done]


def show_validation_steps(output_dir: str, done: list) -> tuple[UUID, UUID] | None:
    """The image grid and the loss table of the validated steps so far (None if none)."""
    if not done:
        return None
    key = run_key(output_dir)
    grid = create_markdown_artifact(
        "\n".join(validation_grid_lines(done)), key=f"{key}-validation-grid",
        description="Validation images of each validated step (raw and EMA adapters)",
    )
    table = create_table_artifact(
        validation_loss_rows(done), key=f"{key}-validation-loss",
        description="Held-out validation loss at fixed noise and timesteps, by step",
    )
    return grid, table


#: Image + caption pairs shown per subset (its captions file has them all).
CAPTION_PAIRS_SHOWN = 12


def caption_lines(model: str, captions: dict) -> list[str]:
    """Counts, why images stayed uncaptioned, then image + caption side by side."""
    lines = [f"**Captions** by `{model}`: {captions['captioned']} made now, "
             f"{captions['from_cache']} from the cache, {captions['kept']} kept as they were, "
             f"{len(captions['uncaptioned'])} uncaptioned", ""]
    lines += [f"- uncaptioned: `{u['file']}` (subset {u['subset']}): {u['reason']}"
              for u in captions["uncaptioned"][:CAPTION_PAIRS_SHOWN]]
    for report in captions["subsets"].values():
        lines += ["", f"captions file: `{storage.redact(report['metadata'])}`", "",
                  "| image | caption |", "|---|---|"]
        for pair in report["pairs"][:CAPTION_PAIRS_SHOWN]:
            url = storage.join(report["address"], pair["file"])
            text = pair["caption"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {image_markdown(url, pair['file'])} | {text} |")
    return lines


def show_captions(output_dir: str, model: str, captions: dict) -> UUID:
    return create_markdown_artifact(
        "\n".join(caption_lines(model, captions)),
        key=f"{run_key(output_dir)}-captions",
        description="Captions: image and caption pairs",
    )
