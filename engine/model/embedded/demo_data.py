"""The demo-shapes dataset: 24 captioned images of coloured shapes, drawn locally.

Why: a training run needs real image/caption pairs that load through ``datasets`` in
the forms users bring (an image folder with ``metadata.jsonl``, a parquet file, a zip
archive), without network access and with byte-identical files on every build, so
that caching, hashing and resume logic can be tested against fixed inputs.

Images are non-square (96x80 landscape and 80x96 portrait, alternating), so resizing
and cropping code paths are always exercised. Captions name the shape, its colour and
the background, e.g. ``"a red circle on a white background"``; every caption word is a
single token of the tiny CLIP tokenizers (see ``tiny_models.py``).
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# Bump when the generated files change, so cached copies (see registry.py) are rebuilt.
DEMO_DATA_VERSION = "1"

NUM_IMAGES = 24
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 210, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((96, 80), (80, 96))  # (width, height)

IMAGEFOLDER_DIRNAME = "imagefolder"
PARQUET_FILENAME = "shapes.parquet"
ZIP_FILENAME = "shapes.zip"
METADATA_FILENAME = "metadata.jsonl"
_SEED = 1234
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # earliest date zip can store: no build-time leak


@dataclass(frozen=True)
class DemoDataPaths:
    """Where one build of the demo data lies, in its three forms.

    ``imagefolder``: folder of PNGs plus ``metadata.jsonl`` (``file_name``, ``text``),
    for ``load_dataset("imagefolder", data_dir=...)``.
    ``parquet``: one file with columns ``image`` (datasets Image, bytes embedded) and
    ``text``, for ``load_dataset("parquet", data_files=...)``.
    ``zip``: the image folder's files at the archive root (no top folder), for
    ``load_dataset("imagefolder", data_files=...)`` or for unpacking.
    """

    imagefolder: Path
    parquet: Path
    zip: Path

    @classmethod
    def at(cls, out_dir: str | Path) -> DemoDataPaths:
        """The paths a ``build_demo_data(out_dir)`` writes (nothing is checked or built)."""
        out = Path(out_dir)
        return cls(
            imagefolder=out / IMAGEFOLDER_DIRNAME,
            parquet=out / PARQUET_FILENAME,
            zip=out / ZIP_FILENAME,
        )


@dataclass(frozen=True)
class DemoSample:
    """One demo image with its file name and caption."""

    file_name: str
    text: str
    image: Image.Image


def _sample_spec(index: int) -> tuple[str, str, str]:
    """Shape, colour and background of sample ``index``.

    Each of the 12 shape/colour pairs appears twice, on two different backgrounds, so
    a caption never repeats.
    """
    combo, repeat = index % 12, index // 12
    shape = SHAPES[combo % len(SHAPES)]
    color = list(COLORS)[combo // len(SHAPES)]
    background = list(BACKGROUNDS)[(combo + repeat) % len(BACKGROUNDS)]
    return shape, color, background


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple
) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + right) // 2, top), (left, bottom), (right, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_sample(index: int) -> DemoSample:
    """Draw sample ``index`` (0-based): same index, same pixels, on any machine."""
    shape, color, background = _sample_spec(index)
    width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    rng = random.Random(_SEED + index)
    half = rng.randint(18, min(width, height) // 2 - 4)
    cx = rng.randint(half + 2, width - half - 3)
    cy = rng.randint(half + 2, height - half - 3)
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    _draw_shape(
        ImageDraw.Draw(image), shape, (cx - half, cy - half, cx + half, cy + half), COLORS[color]
    )
    text = f"a {color} {shape} on a {background} background"
    return DemoSample(file_name=f"{index:04d}.png", text=text, image=image)


def demo_samples() -> list[DemoSample]:
    """All demo samples, in file-name order."""
    return [make_sample(i) for i in range(NUM_IMAGES)]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _metadata_jsonl(samples: list[DemoSample]) -> str:
    lines = [json.dumps({"file_name": s.file_name, "text": s.text}) for s in samples]
    return "\n".join(lines) + "\n"


def _write_imagefolder(folder: Path, samples: list[DemoSample]) -> dict[str, bytes]:
    """Write PNGs and metadata.jsonl; return the files' bytes by name (for zip/parquet)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {s.file_name: _png_bytes(s.image) for s in samples}
    files[METADATA_FILENAME] = _metadata_jsonl(samples).encode("utf-8")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _write_zip(path: Path, files: dict[str, bytes]) -> None:
    """Zip ``files`` at the archive root with fixed metadata, so the bytes never vary."""
    with zipfile.ZipFile(path, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, whatever the building OS
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])


def _write_parquet(path: Path, samples: list[DemoSample], files: dict[str, bytes]) -> None:
    """Write the parquet form with the PNG bytes embedded in the ``image`` column."""
    import datasets

    table = {
        "image": [{"bytes": files[s.file_name], "path": s.file_name} for s in samples],
        "text": [s.text for s in samples],
    }
    dataset = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    dataset.to_parquet(str(path))


def build_demo_data(out_dir: str | Path) -> DemoDataPaths:
    """Build the demo data into ``out_dir`` (created if missing; files overwritten).

    Layout: ``imagefolder/`` (0000.png ... 0023.png, metadata.jsonl), ``shapes.parquet``
    and ``shapes.zip``. The same call always writes byte-identical files.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = DemoDataPaths.at(out_dir)
    samples = demo_samples()
    files = _write_imagefolder(paths.imagefolder, samples)
    _write_zip(paths.zip, files)
    _write_parquet(paths.parquet, samples, files)
    return paths
