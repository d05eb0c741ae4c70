"""The image policy: which files are training images, how they decode, why one is skipped.

:func:`decode_image` is used both when a dataset is prepared and when it is trained on, so
an image accepted once always loads later.

* Formats: PNG, JPEG (and MPO), WebP, GIF, BMP, TIFF, AVIF. Others are skipped, as PIL
  plugins for rarer formats (EPS runs Ghostscript) are not worth the risk.
* Size: at most :data:`MAX_PIXELS` (8192 x 8192) pixels, checked from the header before
  decoding (decompression bombs); at least :data:`MIN_SIDE` (8) pixels on the shorter
  side, since smaller files are icons or tracking pixels, not training images.
* EXIF orientation is applied, so a record's ``width``/``height`` is the size as seen;
  animated images use their first frame; every mode ends as 8-bit RGB (see
  :func:`engine.data.transforms.to_rgb`: 16-bit scaled, transparency composited on white).
* Unreadable, truncated, empty, too big or too small images are skipped, each with the
  reason :func:`skip_reason` gives (never an exception: sources are untrusted).
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps

from engine.data.transforms import to_rgb

#: Largest image accepted, in pixels (checked from the header, before decoding).
MAX_PIXELS = 8192 * 8192
#: Smallest accepted shorter side, in pixels.
MIN_SIDE = 8
#: Largest image file accepted, in bytes.
MAX_IMAGE_BYTES = 256 * 1024**2
#: PIL formats accepted, and the extension each is stored under.
IMAGE_FORMATS: dict[str, str] = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tiff",
    "AVIF": ".avif",
}
#: ``<_io.BytesIO object at 0x7f...>`` in PIL's messages: a memory address, which would
#: make the same dataset's manifest differ from run to run and names nothing useful.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


class ImageRejected(ValueError):
    """An image that :func:`decode_image` refuses (too big, too small, wrong format)."""


def decode_image(data: bytes) -> Image.Image:
    """The image in ``data`` as 8-bit RGB, EXIF orientation applied, first frame only.

    Raises :class:`ImageRejected` for images outside the policy (see the module doc) and
    whatever PIL raises for broken files.
    """
    return _decode(data)[0]


def check_image(data: bytes) -> tuple[str, int, int]:
    """(extension, width, height) of an acceptable image; raises with a reason if not."""
    rgb, fmt = _decode(data)
    return IMAGE_FORMATS[fmt], rgb.width, rgb.height


def skip_reason(err: Exception) -> str:
    """Why an image was skipped, for the manifest: the policy's words, or what PIL said."""
    if isinstance(err, ImageRejected):
        return str(err)
    return _OBJECT_REPR.sub("", f"unreadable image: {type(err).__name__}: {err}")


def _decode(data: bytes) -> tuple[Image.Image, str]:
    """(RGB image, PIL format name) of ``data``."""
    if not data:
        raise ImageRejected("empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRejected(f"file of {len(data)} bytes exceeds {MAX_IMAGE_BYTES}")
    with warnings.catch_warnings():
        # PIL warns above its own limit (89 Mpx); ours is lower and checked right below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data), formats=_openable_formats())
        except Image.DecompressionBombError as err:
            raise ImageRejected(f"too large ({err})") from None
        with opened as image:
            fmt = image.format or ""
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageRejected(f"too large: {width}x{height} pixels (limit {MAX_PIXELS})")
            image.load()
            rgb = to_rgb(_oriented(image))
    if min(rgb.size) < MIN_SIDE:
        raise ImageRejected(f"too small: {rgb.width}x{rgb.height} (minimum side {MIN_SIDE} px)")
    return rgb, fmt


def _openable_formats() -> list[str]:
    """The accepted formats this Pillow build can open (AVIF is optional; MPO files are
    opened by the JPEG plugin, so it is not asked for by name)."""
    Image.init()
    return [f for f in IMAGE_FORMATS if f in Image.OPEN]


def _oriented(image: Image.Image) -> Image.Image:
    """A loaded copy of ``image`` turned by its EXIF orientation (broken EXIF: unturned)."""
    try:
        turned = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF must not make an otherwise good image unusable
        return image.copy()
    return turned if turned is not None else image.copy()
