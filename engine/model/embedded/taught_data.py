"""``loraflow/demo-shapes-sks``: shapes in a colour the tiny-shapes model never saw.

Why: the quickstart must teach its base model something it could not draw, so that the
validation images show the LoRA's effect. ``loraflow/tiny-shapes`` was trained on red,
green, blue and yellow shapes; here every shape is magenta, and its captions name that
colour only by the trigger word ``sks`` (``"a sks circle on a white background"``), a
token the base model never saw in a caption. Base and LoRA images for these captions
differ in the shape's colour, which a test can measure (see :data:`TAUGHT_COLOR`).

27 images of 64x64 px (each shape on each background, three sizes and positions),
drawn like the base model's training images and written as an image folder
(``metadata.jsonl`` beside the PNGs); the same build always writes the same bytes.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from engine.model.embedded.demo_data import BACKGROUNDS, METADATA_FILENAME, SHAPES
from engine.model.embedded.shape_images import draw

TAUGHT_DATA_ID = "loraflow/demo-shapes-sks"
# Bump when the generated files change, so cached copies (see registry.py) are rebuilt.
TAUGHT_DATA_VERSION = "1"
TRIGGER_WORD = "sks"
#: Magenta: far (>= 150 in RGB) from every colour and background the base model knows.
TAUGHT_COLOR: tuple[int, int, int] = (230, 40, 200)
NUM_IMAGES = 27
_SEED = 4321


def taught_captions() -> list[str]:
    """The caption of each image, in file order."""
    combos = [(s, b) for s in SHAPES for b in BACKGROUNDS]
    return [
        f"a {TRIGGER_WORD} {shape} on a {background} background"
        for shape, background in (combos[i % len(combos)] for i in range(NUM_IMAGES))
    ]


def build_taught_data(out_dir: str | Path) -> Path:
    """Write the PNGs (0000.png ...) and ``metadata.jsonl`` into ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(_SEED)
    lines = []
    combos = [(s, b) for s in SHAPES for b in BACKGROUNDS]
    for i, text in enumerate(taught_captions()):
        shape, background = combos[i % len(combos)]
        image = draw(shape, TAUGHT_COLOR, BACKGROUNDS[background], rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        name = f"{i:04d}.png"
        (out / name).write_bytes(buffer.getvalue())
        lines.append(json.dumps({"file_name": name, "text": text}))
    (out / METADATA_FILENAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
