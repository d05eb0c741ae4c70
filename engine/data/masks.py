"""Loss masks: which pixels of an image the loss learns from (white) and which not (black).

A subset asks for masks in one of two ways (``DatasetArgs``):

* ``masks: "beside"``: the mask of ``dog.png`` is ``dog_mask.<ext>`` in the same folder
  (any image extension; the usual one is ``.png``), in image folders and kohya caption
  folders alike. Such files are then never training images themselves
  (:func:`without_mask_files`); with ``masks: "none"`` (the default) a file named
  ``x_mask.png`` is an ordinary image, as it always was.
* ``mask_column``: a column of the table or ``metadata.jsonl`` holding each row's mask,
  as an image or as a path read exactly like the image column's (inside the dataset only).

Rules, and why:

* **Every kept image of a masked subset needs its mask**, checked at preparation, and a
  missing, unreadable or wrongly sized mask is a :class:`DatasetError` naming the file,
  not a skipped image: a mask is an explicit instruction, and silently training the
  example without it (or dropping it) changes what is learnt. An image that is skipped
  for its own reasons needs no mask. To train a whole image, give it a white mask.
* The mask must have its image's size as seen (EXIF orientation applied to each).
* Values: the mask's grey level, 0 (black) to 1 (white). A mask with transparency is
  composited on BLACK first, so a cut-out (subject opaque, background transparent) masks
  the background out; 16-bit grey is scaled to [0, 1] exactly. Colour masks use PIL's
  luma (``convert("L")``).
* The original mask bytes are stored beside the images (``masks/000000.png``), the
  record holding ``"mask"`` and ``"mask_sha256"``; so the dataset's ``content_hash``, and
  every cache keyed by it, follows the masks. A subset without masks writes nothing new.

How a mask follows its image into a bucket and down to latent size:
:mod:`engine.data.mask_transforms`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from engine.data.caption_files import IMAGE_EXTENSIONS
from engine.data.errors import DatasetError
from engine.data.images import IMAGE_FORMATS, MAX_IMAGE_BYTES, MAX_PIXELS
from engine.data.reread import RereadFiles
from engine.task.definition import DatasetArgs

#: What ends the stem of a mask beside its image: ``dog.png`` -> ``dog_mask.png``.
MASK_SUFFIX = "_mask"
#: Where the masks of a prepared dataset are stored, beside ``images/``.
MASKS_DIR = "masks"
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def wants_masks(args: DatasetArgs) -> bool:
    """Whether a subset trains with loss masks."""
    return args.masks != "none" or args.mask_column is not None


def check_mask_args(args: DatasetArgs) -> None:
    """Refuse mask settings that cannot be honoured, before any work."""
    if args.masks != "none" and args.mask_column is not None:
        raise DatasetError("dataset: set one of masks 'beside' and mask_column, not both")
    if wants_masks(args) and args.shards:
        raise DatasetError("dataset: masks are not read from webdataset shards; prepare the "
                           "images as an image folder or a table with a mask column")


def is_mask_file(name: str) -> bool:
    """Whether a file name is a mask beside an image (``dog_mask.png``)."""
    path = Path(name)
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.endswith(MASK_SUFFIX)


def without_mask_files(files: list[str], args: DatasetArgs) -> list[str]:
    """``files`` without the masks beside images, when the subset reads them (else all)."""
    if args.masks != "beside":
        return files
    return [f for f in files if not is_mask_file(f)]


def mask_file(index: int, extension: str) -> str:
    """Where the ``index``-th kept example's mask is stored, relative to the dataset."""
    return f"{MASKS_DIR}/{index:06d}{extension}"


# -- reading a mask ----------------------------------------------------------------------


class MaskRejected(ValueError):
    """Bytes that are not a usable mask image (the reason is the message)."""


def decode_mask(data: bytes) -> Image.Image:
    """The mask in ``data`` as a float image (PIL mode ``F``) of values in [0, 1].

    EXIF orientation is applied and the first frame of an animation is used, as for
    images; see the module doc for how grey, colour, 16-bit and transparency map to
    weights. Raises :class:`MaskRejected` saying why for anything else.
    """
    return _decode(data)[0]


def _decode(data: bytes) -> tuple[Image.Image, str]:
    """(float mask, PIL format name) of ``data``."""
    if not data:
        raise MaskRejected("empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise MaskRejected(f"file of {len(data)} bytes exceeds {MAX_IMAGE_BYTES}")
    Image.init()
    formats = [f for f in IMAGE_FORMATS if f in Image.OPEN]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data), formats=formats)
            with opened as image:
                if image.width * image.height > MAX_PIXELS:
                    raise MaskRejected(f"too large: {image.width}x{image.height} pixels")
                image.load()
                fmt = image.format or ""
                values = _weights(_oriented(image))
        except MaskRejected:
            raise
        except Exception as err:  # untrusted files: PIL raises many types
            raise MaskRejected(f"not a readable image ({type(err).__name__})") from None
    return Image.fromarray(values), fmt


def _oriented(image: Image.Image) -> Image.Image:
    try:
        turned = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: the mask as stored, like images
        return image.copy()
    return turned if turned is not None else image.copy()


def _weights(image: Image.Image) -> np.ndarray:
    """float32 [H, W] in [0, 1]: grey level; transparency composited on black."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.float64), 0, 65535) / 65535.0
        return values.astype(np.float32)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    return grey / np.float32(255.0)


def check_mask(data: bytes, image_size: tuple[int, int], where: str) -> str:
    """The extension a mask is stored under; a DatasetError naming ``where`` for a mask
    that is not an image of the image's (width, height)."""
    try:
        mask, fmt = _decode(data)
    except MaskRejected as err:
        raise DatasetError(f"mask {where}: {err}") from None
    if mask.size != tuple(image_size):
        raise DatasetError(
            f"mask {where} is {mask.width}x{mask.height} but its image is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size"
        )
    return IMAGE_FORMATS[fmt]


def stored_mask_bytes(address: str, record: Mapping[str, Any]) -> bytes:
    """The stored mask of a prepared record, checked against its ``mask_sha256``."""
    from engine.store import storage

    where = f"{address}/{record['mask']}"
    try:
        data = storage.read_bytes(storage.join(address, record["mask"]))
    except FileNotFoundError:
        raise DatasetError(f"{where}: missing (storage corrupted or modified)") from None
    if hashlib.sha256(data).hexdigest() != record["mask_sha256"]:
        raise DatasetError(f"{where}: content does not match its sha256 (storage corrupted "
                           "or modified)")
    return data


# -- finding masks at preparation ----------------------------------------------------------


class MaskFinder:
    """Finds each row's mask in a loaded source, as :func:`prepare_dataset` checks rows.

    ``source`` is an :class:`engine.data.sources.Source` (image column undecoded); rows
    are the dataset's (after filters).
    """

    def __init__(self, args: DatasetArgs, source: Any) -> None:
        from engine.data.sources import as_image_column

        self.args, self.source = args, source
        self.column = args.mask_column
        self._rows = None
        if self.column is not None:
            names = list(source.dataset.column_names)
            if self.column not in names:
                raise DatasetError(f"mask column {self.column!r} not found; the dataset has "
                                   f"columns {names}")
            source.dataset = as_image_column(source.dataset, self.column)
            self._rows = source.dataset.select_columns([self.column])

    @classmethod
    def of(cls, args: DatasetArgs, source: Any) -> MaskFinder | None:
        """The finder of a masked subset; None when it has no masks."""
        check_mask_args(args)
        return cls(args, source) if wants_masks(args) else None

    def find(self, index: int, image_value: Any) -> tuple[str, bytes]:
        """(name for messages, bytes) of row ``index``'s mask; DatasetError if none."""
        from engine.data.images import ImageRejected
        from engine.data.sources import image_bytes, image_name

        if self._rows is not None:
            value = self._rows[index][self.column]
            name = (image_name(value, self.source) if value else None) or (
                f"of row {self.source.source_row(index)}")
            try:
                return name, image_bytes(value, self.source)
            except ImageRejected as err:
                raise DatasetError(f"mask {name} (column {self.column!r}): {err}") from None
        path = image_value.get("path") if isinstance(image_value, dict) else None
        image = image_name(image_value, self.source) or f"of row {index}"
        if not path or "://" in path or image_value.get("bytes") is not None:
            raise DatasetError(
                f"image {image}: masks 'beside' need image files in a folder, and this "
                "source's images are embedded; use dataset.mask_column"
            )
        found = self._beside(self._located(Path(path)), image)
        name = image_name({"path": str(found)}, self.source) or found.name
        try:
            return name, image_bytes({"path": str(found), "bytes": None}, self.source)
        except ImageRejected as err:
            raise DatasetError(f"mask {name}: {err}") from None

    def _located(self, image: Path) -> Path:
        """A relative image path (a table's) where its image was read from."""
        if image.is_absolute():
            return image
        for folder in self.source.search:
            if (folder / image).is_file():
                return folder / image
        return self.source.search[0] / image

    def _beside(self, image: Path, name: str) -> Path:
        stem = image.stem + MASK_SUFFIX
        found = sorted(p for p in image.parent.glob(stem + ".*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise DatasetError(
                f"image {name} has no mask {Path(name).with_name(stem + '.png').as_posix()} "
                "(dataset.masks is 'beside': every image needs one; a white mask trains "
                "the whole image)"
            )
        if len(found) > 1:
            raise DatasetError(f"image {name} has several masks "
                               f"({', '.join(p.name for p in found)}); keep one")
        real = found[0].resolve()
        if not any(r == real or r in real.parents for r in self.source.roots):
            raise DatasetError(f"mask of {name} links outside the dataset")
        return found[0]


def kept_masks(finder: MaskFinder, rows: Any, column: str,
               files: dict[str, tuple[int, str]]) -> RereadFiles:
    """The kept examples' masks as the commit wants them (name -> bytes), read from the
    source again when asked and refused if changed since they were checked."""

    def read(index: int) -> tuple[str, bytes]:
        where, data = finder.find(index, rows[index][column])
        return f"mask {where}", data

    return RereadFiles(files, read)
