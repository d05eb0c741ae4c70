"""The trained ``loraflow/tiny-shapes`` model draws shapes; the quickstart LoRA visibly teaches it.

Why these tests: the quickstart's promise is that a user *sees* the LoRA learn. Two
measurements guard it, on the committed weights (nothing is retrained here):

* the base model draws what a demo-shapes caption asks for: the image border is the
  named background, and the pixels that differ from it (the shape) have the named
  colour, nearer to it than to any other demo colour;
* the quickstart (``examples/quickstart.json``, the real file) trains a LoRA on
  ``loraflow/demo-shapes-sks`` (magenta shapes, captioned with the trigger word
  ``sks``), and for the same prompts and seeds the LoRA's shapes are nearer to magenta
  than the base model's by :data:`MARGIN` (RGB distance, 0..441) on average, and by half
  of it in each image; the published card shows both images side by side.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.model.embedded import registry, shapes_model, taught_data
from engine.model.embedded.demo_data import BACKGROUNDS, COLORS
from engine.model.embedded.shape_images import caption

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = ROOT / "examples" / "quickstart.json"
#: The LoRA's shapes must be this much nearer to the taught colour than the base's
#: (RGB distance, mean over the quickstart's 2 images; each image at least half of it).
#: Measured with the committed weights: gains 155 and 79 (base 303 -> LoRA 148, 193 ->
#: 114). The LoRA cannot reach 0: the VAE itself gives the taught images back at a
#: distance of 70-130 (it desaturates magenta).
MARGIN = 60.0
#: Pixels farther than this from the background colour count as the shape.
SHAPE_THRESHOLD = 60.0
MAX_WEIGHTS_BYTES = 3_000_000


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def background_color(image: Image.Image) -> np.ndarray:
    """Median colour of the one-pixel border."""
    a = _rgb(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return np.median(border, axis=0)


def shape_color(image: Image.Image) -> tuple[np.ndarray, float]:
    """(mean colour, area fraction) of the pixels that differ from the background."""
    a = _rgb(image)
    mask = np.linalg.norm(a - background_color(image), axis=-1) > SHAPE_THRESHOLD
    if not mask.any():
        return background_color(image), 0.0
    return a[mask].mean(axis=0), float(mask.mean())


def distance(color: np.ndarray, rgb: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(color - np.asarray(rgb, dtype=np.float64)))


def test_committed_weights_are_the_recorded_file() -> None:
    path = shapes_model.WEIGHTS_FILE
    assert path.stat().st_size < MAX_WEIGHTS_BYTES
    assert shapes_model.weights_sha256(path) == shapes_model.WEIGHTS_SHA256
    assert shapes_model.SHAPES_MODEL_VERSION.endswith(shapes_model.WEIGHTS_SHA256[:12])


def test_taught_data_is_byte_stable_and_in_the_taught_colour(tmp_path: Path) -> None:
    a = taught_data.build_taught_data(tmp_path / "a")
    b = taught_data.build_taught_data(tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in files)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == taught_data.NUM_IMAGES
    assert all(f" {taught_data.TRIGGER_WORD} " in row["text"] for row in rows)
    for row in rows:
        color, area = shape_color(Image.open(a / row["file_name"]))
        assert distance(color, taught_data.TAUGHT_COLOR) < 5 and area > 0.05
    resolved = Path(registry.resolve_dataset(taught_data.TAUGHT_DATA_ID))
    assert (resolved / "metadata.jsonl").read_bytes() == (a / "metadata.jsonl").read_bytes()


#: (colour, shape, background) prompts the base model must draw recognisably.
BASE_PROMPTS = [
    ("red", "circle", "white"), ("green", "square", "black"), ("blue", "square", "white"),
    ("yellow", "circle", "black"), ("red", "triangle", "white"), ("green", "circle", "gray"),
    ("blue", "triangle", "white"), ("yellow", "square", "white"),
]


@pytest.fixture(scope="module")
def shapes_pipe() -> object:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        registry.resolve_model(shapes_model.SHAPES_MODEL_ID), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_base_model_draws_the_captioned_shape(shapes_pipe: object) -> None:
    hits, report = 0, []
    for seed, (color, shape, background) in enumerate(BASE_PROMPTS):
        image = shapes_pipe(  # type: ignore[operator]
            caption(color, shape, background), num_inference_steps=10,
            guidance_scale=shapes_model.GUIDANCE_SCALE, height=64, width=64,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        fg, area = shape_color(image)
        nearest = min(COLORS, key=lambda name: distance(fg, COLORS[name]))
        bg_ok = distance(background_color(image), BACKGROUNDS[background]) < 60
        ok = bg_ok and nearest == color and 0.03 < area < 0.8
        hits += ok
        report.append(f"{color} {shape} on {background}: shape {fg.round()} ({nearest}), "
                      f"area {area:.2f}, background ok {bg_ok}")
    print("\n".join(report))
    assert hits >= len(BASE_PROMPTS) - 1, "\n".join(report)


def test_quickstart_lora_moves_the_shapes_to_the_taught_colour(tmp_path: Path) -> None:
    from engine.data.prepared import load_dataset_for_task
    from engine.infer.validation import validate_checkpoint
    from engine.lora.publish import publish_lora
    from engine.task.validation import validate_document
    from engine.train.segment import SegmentOptions, run_segment

    task = validate_document(json.loads(QUICKSTART.read_text()))
    assert task.model.name == shapes_model.SHAPES_MODEL_ID
    assert task.dataset.name == taught_data.TAUGHT_DATA_ID
    checkpoint = None
    for index in range(10):
        result = run_segment(task, str(tmp_path / "segments" / f"{index:04d}"),
                             SegmentOptions(checkpoint=checkpoint, validate=False))
        checkpoint = result.checkpoint
        if result.finished:
            break
    data = load_dataset_for_task(task, None)
    images = validate_checkpoint(task, checkpoint, str(tmp_path), data)
    assert len(images.base) == len(images.lora) == task.validation.num_images

    published = publish_lora(
        checkpoint, task, str(tmp_path), dataset_hash="test", captions=[],
        validation_images=images.lora, base_images=images.base, metrics_url=None,
        run_summary={"run_name": "quickstart"},
    )
    card = Path(published["readme"]).read_text()
    assert "## Base model vs LoRA" in card
    for i in range(len(images.lora)):
        assert f"![base image {i}](validation/base/{i:02d}.png)" in card
        assert (Path(published["lora_dir"]) / "validation" / "base" / f"{i:02d}.png").is_file()

    gains = []
    for base_url, lora_url in zip(images.base, images.lora, strict=True):
        base = Image.open(io.BytesIO(Path(base_url).read_bytes()))
        lora = Image.open(io.BytesIO(Path(lora_url).read_bytes()))
        d_base = distance(shape_color(base)[0], taught_data.TAUGHT_COLOR)
        d_lora = distance(shape_color(lora)[0], taught_data.TAUGHT_COLOR)
        gains.append(d_base - d_lora)
        print(f"distance to the taught colour: base {d_base:.0f}, LoRA {d_lora:.0f}")
    assert min(gains) >= MARGIN / 2, gains
    assert float(np.mean(gains)) >= MARGIN, gains
