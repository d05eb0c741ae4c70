"""Image folders captioned by same-named text files (the kohya / OneTrainer layout).

The most common layout there is: ``dog1.png`` beside ``dog1.txt``, often in folders named
``NN_name`` (kohya's repeat prefix: ``10_sks dog/`` means each image in it is used 10 times
per epoch), possibly nested. ``datasets``' imagefolder ignores the ``.txt`` files, so such
a folder is read here: :func:`is_caption_folder` recognises it and :func:`load_caption_folder`
builds its rows (an image path column and a caption column, named as the task names them)
without ``datasets`` touching the folder.

Rules, and why:

* Recognised: a folder with no ``metadata.*`` file and no data file (csv, parquet, ...),
  where at least one image has a caption file (``DatasetArgs.caption_extension``, default
  ``.txt``) of the same name beside it. Hidden files and folders are left out.
* Only files inside the folder are read: a link that leads outside it is skipped with a
  reason (folder links are not followed at all).
* Each non-empty line of a caption file is one caption (one line: one caption, as kohya
  writes them; several lines: the trainer picks one per use, as OneTrainer does).
  A UTF-8 byte order mark (Windows editors write one) is dropped.
* **An image whose caption file is missing is skipped**, with the reason (``caption file
  dog3.txt missing``) in the manifest's ``skipped`` and so in the run's log. Training it
  uncaptioned would teach the concept to the empty prompt, silently, which only a new
  run undoes; a missing file is far more often a typo (``dog3.png.txt``, ``dog3.TXT``)
  than a wish. Who wants an uncaptioned image says so with an empty caption file.
  (kohya would use the folder name as the caption; a folder name is not a caption a
  user wrote, so that is not done.)
* **An empty caption file** trains its image with an empty caption (a user made it), is
  counted in ``empty_captions`` and listed by name in the manifest's ``caption_files``.
* **A caption file that is not UTF-8** skips its image, the reason naming the file, the
  byte and its offset, so the user can find it. So does one over
  :data:`MAX_CAPTION_BYTES` (not a caption).
* Repeats: the innermost folder, the source folder itself included, with an ``NN_``
  prefix gives an image its repeats (kept as the record's ``"repeats"`` when more than
  1); the folders and their repeats are listed in the manifest's ``caption_files``.
  ``0_name`` is an error: its images would never train.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.errors import DatasetError

#: Largest caption file read, in bytes (a caption is a line or a few, never megabytes).
MAX_CAPTION_BYTES = 64 * 1024
#: Image file extensions looked for (the formats of :mod:`engine.data.images`).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".webp", ".gif", ".bmp", ".tif",
     ".tiff", ".avif"}
)
#: kohya's repeat prefix: ``10_sks dog``.
_REPEAT_PREFIX = re.compile(r"^(\d+)_(.+)$")
#: Files whose presence makes a folder something else (an imagefolder, tabular files).
_METADATA_NAMES = frozenset({"metadata.jsonl", "metadata.csv", "metadata.parquet"})
_DATA_SUFFIXES = frozenset(
    {".parquet", ".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".arrow"}
)
#: Most file names listed in the manifest's ``caption_files`` per kind.
_LISTED = 50


@dataclass
class CaptionFolder:
    """The rows of a caption folder, in sorted path order.

    ``images``: absolute image paths; ``captions``: each row's captions (None for a
    rejected row); ``rejected``: row -> why it is skipped; ``repeats``: row -> its folder's
    repeat count (rows not listed: 1); ``report``: what goes into the manifest.
    """

    images: list[str] = field(default_factory=list)
    captions: list[list[str] | None] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    repeats: dict[int, int] = field(default_factory=dict)
    missing: int = 0
    report: dict[str, Any] = field(default_factory=dict)


def is_caption_folder(folder: Path, caption_extension: str) -> bool:
    """Whether ``folder`` is laid out as images with same-named caption files."""
    found = False
    for _directory, files in _walk(folder):
        names = set(files)
        for name in files:
            if name in _METADATA_NAMES or Path(name).suffix.lower() in _DATA_SUFFIXES:
                return False
            path = Path(name)
            if (path.suffix.lower() in IMAGE_EXTENSIONS
                    and path.stem + caption_extension in names):
                found = True
    return found


def load_caption_folder(folder: Path, caption_extension: str,
                        skip: Callable[[str], bool] | None = None, *,
                        keep_uncaptioned: bool = False) -> CaptionFolder:
    """Read every image path and caption file under ``folder`` (see the module doc);
    image names ``skip`` accepts (masks beside their images) are not rows.

    ``keep_uncaptioned`` (the task captions its images: ``captioning``): an image without
    a caption file is kept with an empty caption, for the caption step to fill, and a
    folder without any caption is no error."""
    root = folder.resolve()
    out = CaptionFolder()
    empty: list[str] = []
    orphans: list[str] = []
    repeat_folders: dict[str, int] = {}
    for directory, files in _walk(root):
        names = set(files)
        repeats = _folder_repeats(Path(root.name) / directory.relative_to(root), repeat_folders)
        images = [n for n in files if Path(n).suffix.lower() in IMAGE_EXTENSIONS
                  and not (skip and skip(n))]
        stems = {Path(n).stem for n in images}
        orphans += [_relative(directory / n, root) for n in files
                    if n.endswith(caption_extension) and n[: -len(caption_extension)] not in stems]
        for name in images:
            row = len(out.images)
            image = directory / name
            out.images.append(str(image))
            if repeats > 1:
                out.repeats[row] = repeats
            caption_name = Path(name).stem + caption_extension
            try:
                _inside(image, root)
                if caption_name not in names and keep_uncaptioned:
                    out.missing += 1
                    out.captions.append([""])
                    continue
                if caption_name not in names:
                    out.missing += 1
                    raise _Rejected(f"caption file {_relative(directory / caption_name, root)} "
                                    f"missing{_near_miss(names, name, caption_name)}")
                captions = _read_captions(directory / caption_name, root)
            except _Rejected as err:
                out.captions.append(None)
                out.rejected[row] = str(err)
                continue
            out.captions.append(captions)
            if captions == [""]:
                empty.append(_relative(directory / caption_name, root))
    if not out.images:
        raise DatasetError(f"{folder}: no image files found")
    if not keep_uncaptioned and all(c is None or c == [""] for c in out.captions):
        raise DatasetError(_no_caption_message(folder, caption_extension, out, len(empty)))
    out.report = {
        "caption_extension": caption_extension,
        "empty": empty[:_LISTED],
        "empty_count": len(empty),
        "without_image": orphans[:_LISTED],
        "without_image_count": len(orphans),
        "repeat_folders": repeat_folders,
    }
    return out


class _Rejected(Exception):
    """Why one image of a caption folder is skipped."""


def _walk(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted visible file names) for ``folder`` and every visible folder below,
    in sorted order, folder links not followed: the same rows on every machine. Lazy, so
    recognising a large image folder with a metadata file stops at that file's folder."""
    for directory, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(directory), sorted(f for f in files if not f.startswith("."))


def _folder_repeats(relative: Path, seen: dict[str, int]) -> int:
    """The repeats of images in the folder at ``relative`` (innermost ``NN_`` prefix).

    ``relative`` starts with the source folder's own name: kohya users point at the
    parent of their ``NN_name`` folders or at one of them, and an archive of a single
    ``10_sks dog/`` folder is read from inside it (:func:`archive_extract.dataset_root`).
    """
    for depth in range(len(relative.parts), 0, -1):
        match = _REPEAT_PREFIX.match(relative.parts[depth - 1])
        if match:
            where = Path(*relative.parts[:depth]).as_posix()
            repeats = int(match.group(1))
            if repeats < 1:
                raise DatasetError(
                    f"folder {where!r}: a repeat prefix of {repeats} would never train its "
                    "images; rename it (1_ or more), or move it out of the dataset"
                )
            seen[where] = repeats
            return repeats
    return 1


def _read_captions(path: Path, root: Path) -> list[str]:
    """The captions of one caption file: its non-empty lines, or ``[""]``."""
    name = _relative(path, root)
    _inside(path, root)
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise _Rejected(f"caption file {name} is larger than {MAX_CAPTION_BYTES} bytes")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _Rejected(
            f"caption file {name} is not UTF-8 (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line] or [""]


def _near_miss(names: set[str], image: str, caption: str) -> str:
    """A hint when a file in the folder looks like the missing caption file misnamed."""
    for other in (image + Path(caption).suffix, *sorted(names)):
        if other in names and other != image and (
            other == image + Path(caption).suffix or other.lower() == caption.lower()
        ):
            return f" (there is {other}: name it {caption})"
    return ""


def _inside(path: Path, root: Path) -> None:
    """Refuse a file whose real location (links resolved) is outside ``root``."""
    real = path.resolve()
    if root not in real.parents:
        raise _Rejected(f"{_relative(path, root)} links outside the dataset")
    if not real.is_file():
        raise _Rejected(f"{_relative(path, root)} is not a file")


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _no_caption_message(
    folder: Path, extension: str, rows: CaptionFolder, empty: int
) -> str:
    reasons = list(dict.fromkeys(rows.rejected.values()))[:3]
    return (
        f"{folder}: no image has a caption: {len(rows.images)} image(s), "
        f"{rows.missing} without a {extension} file, {empty} with an empty one, "
        f"{len(rows.rejected) - rows.missing} refused"
        + (f" (e.g. {'; '.join(reasons)})" if reasons else "")
        + f"; write a caption file beside each image (dataset.caption_extension is {extension})"
    )
