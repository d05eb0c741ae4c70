"""What the UI shows of a run, without a server: keys, names, thumbnails, the chart.

Before: two runs into different parents named ``quickstart/`` shared artifact keys (one
history for two runs); runs had random names (``eager-panda``); a real-size validation
PNG above the inline limit showed only as a path a browser cannot open; and there was no
loss or learning-rate curve.
"""

from __future__ import annotations

import base64
import io
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.train.options import SegmentResult, StopReason
from flows.artifacts import (
    INLINE_IMAGE_BYTES,
    THUMBNAIL_PIXELS,
    image_markdown,
    run_key,
    training_curve,
)
from flows.charts import moving_mean, training_chart
from flows.run_names import readable_run_name
from tasks.payloads import SegmentSummary

KEY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")  # what Prefect accepts as an artifact key


def test_runs_into_different_parents_with_the_same_name_get_different_keys() -> None:
    a, b = run_key("/home/me/a/quickstart"), run_key("/home/me/b/quickstart")
    assert a != b
    assert a.startswith("quickstart-") and b.startswith("quickstart-")
    assert run_key("/home/me/a/quickstart") == a  # stable: one history per folder
    for url in ("s3://bucket/runs/My Run_2", "/x/" + "long" * 30, "/", "memory://"):
        key = run_key(url)
        assert KEY.match(key) and len(key) <= 48, key


def test_run_names_are_the_folder_or_dataset_and_the_minute() -> None:
    when = datetime(2026, 12, 1, 23, 15, 42, tzinfo=timezone.utc)
    assert readable_run_name("/home/me/runs/quickstart", None, when) == \
        "quickstart-2026-12-01-2315"
    assert readable_run_name("s3://b/runs/My Run/", None, when) == "my-run-2026-12-01-2315"
    task = {"dataset": {"name": "loraflow/demo-shapes"}}
    assert readable_run_name("runs/{flow_run_name}", task, when) == \
        "demo-shapes-2026-12-01-2315"
    by_url = {"dataset": {"url": "https://x.org/data/naruto.tar.gz"}}
    assert readable_run_name("runs/{date}", by_url, when).startswith("naruto-")
    assert readable_run_name("", None, when) == "finetune-2026-12-01-2315"


def _noise_png(path: Path, size: int) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _inline_image(markdown: str) -> Image.Image:
    found = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown)
    assert found, markdown[:200]
    return Image.open(io.BytesIO(base64.b64decode(found.group(1))))


def test_a_real_size_validation_image_is_shown_as_an_inline_thumbnail(tmp_path: Path) -> None:
    big = _noise_png(tmp_path / "00.png", 1024)
    assert big.stat().st_size > INLINE_IMAGE_BYTES  # too big to inline as it is
    markdown = image_markdown(str(big), "00.png")
    thumbnail = _inline_image(markdown)
    assert max(thumbnail.size) == THUMBNAIL_PIXELS and thumbnail.size[0] == thumbnail.size[1]


def test_a_small_image_is_inlined_as_it_is_and_a_broken_one_is_linked(tmp_path: Path) -> None:
    small = _noise_png(tmp_path / "small.png", 64)
    markdown = image_markdown(str(small), "small.png")
    assert base64.b64encode(small.read_bytes()).decode() in markdown
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert image_markdown(str(broken), "broken.png") == f"- [broken.png]({broken})"


def _segment(tmp_path: Path, index: int, steps: range) -> SegmentSummary:
    metrics = tmp_path / f"metrics-{index}.jsonl"
    metrics.write_text("".join(
        json.dumps({"global_step": s, "loss": 1.0 / s, "lr": 1e-4 * s, "samples": 5,
                    "seconds": 0.1}) + "\n" for s in steps))
    result = SegmentResult(steps_done=len(steps), start_step=steps[0] - 1,
                           global_step=steps[-1], total_steps=6, finished=steps[-1] == 6,
                           stopped_by=StopReason.STEPS, seconds=1.0, checkpoint="c",
                           validation=[], metrics=str(metrics))
    return SegmentSummary(index=index, output_dir=str(tmp_path), dataset_hash="h", result=result)


def test_the_curve_is_every_step_once_in_order(tmp_path: Path) -> None:
    segments = [_segment(tmp_path, 1, range(3, 5)), _segment(tmp_path, 0, range(1, 3)),
                _segment(tmp_path, 2, range(4, 7))]  # step 4 twice: counted once
    steps, losses, lrs = training_curve(segments)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses[0] == 1.0 and lrs[-1] == pytest.approx(6e-4)


def test_the_chart_is_a_png_with_two_panels() -> None:
    png = training_chart([1, 2, 3], [0.5, 0.4, float("nan")], [1e-4, 1e-4, 5e-5])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (720, 400)
    assert len(png) < INLINE_IMAGE_BYTES
    assert len(image.getcolors(maxcolors=1 << 16)) > 3  # lines and labels, not a blank page
    Image.open(io.BytesIO(training_chart([5], [0.3], [1e-4])))  # one step: a dot
    assert moving_mean([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]


def test_the_result_shows_base_and_lora_images_side_by_side(tmp_path: Path) -> None:
    from flows.artifacts import base_vs_lora_lines
    from tasks.payloads import ValidationResult

    urls = []
    for name, color in (("base.png", "green"), ("lora.png", "magenta")):
        Image.new("RGB", (64, 64), color).save(tmp_path / name)
        urls.append(str(tmp_path / name))
    lines = base_vs_lora_lines(ValidationResult(images=[urls[1]], base_images=[urls[0]]))
    assert "## Base model vs LoRA (same prompts and seeds)" in lines
    row = lines[-1]
    assert row.startswith("| 0 | ![base 0](data:image/png;base64,")
    assert row.count("data:image/png;base64,") == 2 and "![LoRA 0](" in row
    assert base_vs_lora_lines(ValidationResult(images=[urls[1]])) == []
