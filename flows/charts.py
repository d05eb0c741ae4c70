"""The loss / learning-rate chart of a run, drawn as a small PNG (Pillow, no plotting library).

Before, there was no loss or learning-rate curve anywhere in the UI. The Prefect UI shows
images in markdown artifacts (as data URIs), so the chart is a picture: two panels over
the steps trained so far, the loss (each step, faint, and a moving mean, bold) above the
learning rate. Pillow is already a dependency (images); matplotlib is not, and a chart of
lines and a few labels does not need it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

WIDTH, PANEL_HEIGHT = 720, 200
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 78, 16, 24, 22
BACKGROUND, AXES, GRID = (255, 255, 255), (90, 90, 90), (228, 228, 228)
RAW_LOSS, MEAN_LOSS, LR = (160, 190, 235), (25, 80, 170), (200, 90, 20)
#: Steps in the moving mean of the loss (fewer at the start of a run).
MEAN_WINDOW = 20


@dataclass(frozen=True)
class Curve:
    """One series of a panel: its values by step, colour and line width."""

    values: Sequence[float]
    color: tuple[int, int, int]
    width: int = 1


def moving_mean(values: Sequence[float], window: int = MEAN_WINDOW) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _label(value: float) -> str:
    return f"{value:.2e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) \
        else f"{value:.4g}"


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, steps: Sequence[int],
           curves: Sequence[Curve], font: ImageFont.ImageFont) -> None:
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    y0, y1 = top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM
    finite = [v for c in curves for v in c.values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5 * (abs(low) or 1.0), high + 0.5 * (abs(high) or 1.0)
    first, last = steps[0], steps[-1]
    span = max(last - first, 1)

    def x(step: int) -> float:
        return left + (right - left) * (step - first) / span

    def y(value: float) -> float:
        return y1 - (y1 - y0) * (value - low) / (high - low)

    for fraction in (0.0, 0.5, 1.0):
        level = y0 + (y1 - y0) * fraction
        draw.line([(left, level), (right, level)], fill=GRID)
        value = high - (high - low) * fraction
        draw.text((4, level - 6), _label(value), fill=AXES, font=font)
    draw.rectangle([left, y0, right, y1], outline=AXES)
    draw.text((left, top + 6), title, fill=(0, 0, 0), font=font)
    draw.text((left, y1 + 4), f"step {first}", fill=AXES, font=font)
    end_label = f"step {last}"
    draw.text((right - draw.textlength(end_label, font=font), y1 + 4), end_label, fill=AXES,
              font=font)
    for curve in curves:
        points = [(x(s), y(v)) for s, v in zip(steps, curve.values, strict=True)
                  if math.isfinite(v)]
        if len(points) == 1:
            (px, py), r = points[0], curve.width + 1
            draw.ellipse([px - r, py - r, px + r, py + r], fill=curve.color)
        elif points:
            draw.line(points, fill=curve.color, width=curve.width)


def training_chart(steps: Sequence[int], losses: Sequence[float], lrs: Sequence[float]) -> bytes:
    """A PNG: loss (per step and moving mean) above the learning rate, over ``steps``."""
    if not steps or not (len(steps) == len(losses) == len(lrs)):
        raise ValueError("a chart needs one loss and one lr per step, and at least one step")
    image = Image.new("RGB", (WIDTH, 2 * PANEL_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    mean = moving_mean(losses)
    _panel(draw, 0, f"loss (faint: each step; bold: mean of last {MEAN_WINDOW})", steps,
           [Curve(losses, RAW_LOSS), Curve(mean, MEAN_LOSS, width=2)], font)
    _panel(draw, PANEL_HEIGHT, "learning rate", steps, [Curve(lrs, LR, width=2)], font)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
