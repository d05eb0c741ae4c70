"""One 64 px shape image: how both the tiny-shapes training images and the taught set look.

Why one place: the LoRA's taught images must be drawn exactly like the images the base
model learned from (same sizes and placement), so the only thing it has to learn is
what differs on purpose (the colour).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from engine.model.embedded.demo_data import _draw_shape

SIZE = 64


def caption(color: str, shape: str, background: str) -> str:
    """The demo-shapes caption form (every word one token of the tiny tokenizer)."""
    return f"a {color} {shape} on a {background} background"


def draw(shape: str, fill: tuple[int, int, int], background: tuple[int, int, int],
         rng: random.Random, size: int = SIZE) -> Image.Image:
    """One shape of random size and position, fully inside a ``size`` square image.

    Half-sizes 12..26 px cover what the demo-shapes images become at 64 px (their shapes
    are 18..36 px half-size in 80..96 px images).
    """
    half = rng.randint(12, 26)
    cx = rng.randint(half + 2, size - half - 3)
    cy = rng.randint(half + 2, size - half - 3)
    image = Image.new("RGB", (size, size), background)
    _draw_shape(ImageDraw.Draw(image), shape, (cx - half, cy - half, cx + half, cy + half), fill)
    return image
