"""Prepare a dataset once into a normalized, content-hashed form; read it back for training.

Why a normalized form: sources come in many shapes (an image folder with
``metadata.jsonl``, parquet/csv/json/arrow files, an archive behind a URL, a Hub
dataset), may be untrusted, and may be slow or gone later. :func:`prepare_dataset`
loads the source with ``datasets``, checks every image, and writes one simple layout to
any fsspec location (local path, ``s3://...``, ``memory://...``)::

    images/000000.png   original bytes of each kept image (never re-encoded)
    records.jsonl       one line per kept example: file, captions, width, height, sha256
    manifest.json       written LAST (the commit marker): count, content_hash, source,
                        skipped images with reasons, columns

``content_hash`` is the sha256 of ``records.jsonl``; since each record holds its image's
sha256 and its captions, it identifies the training data exactly. Training reads only
this layout, through :func:`open_dataset`, which trusts a folder only when its manifest
exists and the records hash matches, and checks each image's sha256 when it is read.

Image policy (:func:`decode_image`, used both when preparing and when training, so an
image accepted here always loads later):

* Formats: PNG, JPEG (and MPO), WebP, GIF, BMP, TIFF, AVIF. Others are skipped, as PIL
  plugins for rarer formats (EPS runs Ghostscript) are not worth the risk.
* Size: at most :data:`MAX_PIXELS` (8192 x 8192) pixels, checked from the header before
  decoding (decompression bombs); at least :data:`MIN_SIDE` (8) pixels on the shorter
  side, since smaller files are icons or tracking pixels, not training images.
* EXIF orientation is applied, so ``width``/``height`` in the records are the size as
  seen; animated images use their first frame; every mode ends as 8-bit RGB (see
  :func:`engine.data.transforms.to_rgb`: 16-bit scaled, transparency composited on white).
* Unreadable, truncated, empty, too big or too small images are skipped and listed in
  the manifest's ``skipped`` as ``{"index": i, "reason": ...}`` (i = row of the source
  split). A dataset with no usable image at all is an error.

Captions: a string or a list of strings per example (the whole list is kept; the
trainer picks one per step). Empty or missing captions are kept as ``[""]`` (training
on some empty captions is legitimate) and counted in ``empty_captions``; a caption
column without a single non-empty caption is an error.

``datasets`` writes its arrow cache into a scratch folder under ``work_dir`` (removed at
the end), never into ``~/.cache``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from PIL import Image, ImageOps

from engine.data import archive
from engine.data.transforms import to_rgb
from engine.errors import LoraflowError
from engine.task.definition import DatasetArgs

FORMAT = "loraflow-dataset/1"
MANIFEST_NAME = "manifest.json"
RECORDS_NAME = "records.jsonl"
IMAGES_DIR = "images"
_MANIFEST_TMP = ".manifest.json.tmp"
_OWN_NAMES = frozenset({MANIFEST_NAME, RECORDS_NAME, IMAGES_DIR, _MANIFEST_TMP})

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
#: Name of the demo dataset that is drawn locally instead of downloaded.
DEMO_DATASET_NAME = "loraflow/demo-shapes"

_TABULAR_MODULES: dict[str, tuple[str, dict[str, Any]]] = {
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".arrow": ("arrow", {}),
}
_IMAGEFOLDER_METADATA = frozenset({"metadata.jsonl", "metadata.csv", "metadata.parquet"})


class DatasetError(LoraflowError, ValueError):
    """A dataset that cannot be prepared or read, with a message saying what to fix."""


class ImageRejected(ValueError):
    """An image that :func:`decode_image` refuses (too big, too small, wrong format)."""


@dataclass(frozen=True)
class DatasetManifest:
    """What a prepared dataset is: small and JSON-able, it travels between pipeline steps."""

    address: str
    count: int
    content_hash: str
    skipped: list[dict] = field(default_factory=list)
    empty_captions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "count": self.count,
            "content_hash": self.content_hash,
            "skipped": [dict(s) for s in self.skipped],
            "empty_captions": self.empty_captions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetManifest:
        return cls(
            address=str(data["address"]),
            count=int(data["count"]),
            content_hash=str(data["content_hash"]),
            skipped=[dict(s) for s in data.get("skipped", [])],
            empty_captions=int(data.get("empty_captions", 0)),
        )


# -- identity of a source ----------------------------------------------------------------


def source_record(args: DatasetArgs) -> dict[str, Any]:
    """The source as recorded in the manifest and hashed into addresses: the DatasetArgs
    as a dict, with credentials removed from the URL (user:password, signatures, tokens).
    """
    record = args.model_dump(mode="json")
    if record.get("url"):
        record["url"] = archive.redact_url(record["url"])
    if record.get("name") == DEMO_DATASET_NAME:
        from engine.model.embedded.demo_data import DEMO_DATA_VERSION

        record["demo_data_version"] = DEMO_DATA_VERSION
    return record


def default_dataset_address(args: DatasetArgs, root: str) -> str:
    """Where the dataset of ``args`` is prepared under ``root``: ``{root}/dataset-{hash}``.

    The hash covers the whole (credential-free) source record, including the column
    names, so the same source is prepared once and found again; note that a local folder
    whose files change keeps its address (prepare into a new root to pick changes up).
    """
    digest = hashlib.sha256(_canonical_json(source_record(args)).encode()).hexdigest()
    return f"{root.rstrip('/')}/dataset-{digest[:16]}"


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# -- images ------------------------------------------------------------------------------


def decode_image(data: bytes) -> Image.Image:
    """The image in ``data`` as 8-bit RGB, EXIF orientation applied, first frame only.

    Raises :class:`ImageRejected` for images outside the policy (see the module doc) and
    whatever PIL raises for broken files.
    """
    return _decode(data)[0]


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


def _check_image(data: bytes) -> tuple[str, int, int]:
    """(extension, width, height) of an acceptable image; raises with a reason if not."""
    rgb, fmt = _decode(data)
    return IMAGE_FORMATS[fmt], rgb.width, rgb.height


# -- loading the source with `datasets` --------------------------------------------------


@dataclass
class _Source:
    """A loaded source split, and where the image paths found in its data may lead.

    ``roots``: folders a path must stay inside. ``search``: folders a relative path is
    tried against (the source folder, then the folders of its data files).
    """

    dataset: Any  # datasets.Dataset
    roots: list[Path]
    search: list[Path]


def _load_source(args: DatasetArgs, work: Path, *, progress: bool) -> _Source:
    cache_dir = work / "hf-cache"
    if args.url:
        downloaded = archive.fetch(args.url, work / "download", progress=progress)
        try:
            extracted = archive.extract(downloaded, work / "extracted")
        except archive.ArchiveError as err:
            raise DatasetError(f"dataset archive refused: {err}") from err
        downloaded.unlink()  # free the disk: only the extracted files are used
        return _load_local(archive.dataset_root(extracted), cache_dir)
    name = args.name or ""
    if name == DEMO_DATASET_NAME:
        from engine.model.embedded.demo_data import build_demo_data

        return _load_local(build_demo_data(work / "demo").imagefolder, cache_dir)
    local = Path(name).expanduser()
    if local.exists():
        return _load_local(local, cache_dir)
    return _load_hub(name, args.config_name, cache_dir)


def _load_local(path: Path, cache_dir: Path) -> _Source:
    """Load a local folder (image folder, or tabular files) or a single tabular file."""
    import datasets

    path = path.resolve()
    if path.is_file():
        module, kwargs = _tabular_module(path)
        files, split, root = [str(path)], "train", path.parent
    else:
        split, files = _local_split_files(path)
        module, kwargs, files = _folder_module(path, files)
        root = path
    search = list(dict.fromkeys([root, *(Path(f).parent for f in files)]))
    try:
        dataset = datasets.load_dataset(
            module, data_files={split: files}, split=split, cache_dir=str(cache_dir), **kwargs
        )
    except (ValueError, TypeError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise DatasetError(f"could not load {path} as {module}: {err}{cause}") from err
    return _Source(dataset, [root], search)


def _tabular_module(path: Path) -> tuple[str, dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in _TABULAR_MODULES:
        return _TABULAR_MODULES[suffix]
    if _is_archive(path):
        raise DatasetError(f"{path} is an archive: pass it as dataset.url (file:// works)")
    known = ", ".join(sorted(_TABULAR_MODULES))
    raise DatasetError(f"{path}: unsupported file type {suffix!r} (expected one of {known})")


def _is_archive(path: Path) -> bool:
    try:
        archive.detect_format(path)
    except (archive.ArchiveError, OSError):
        return False
    return True


def _local_split_files(folder: Path) -> tuple[str, list[str]]:
    """The split to use (see :func:`_pick_split`) and its files, by ``datasets``' naming
    rules (``train/`` folders, ``*-train-*`` files...); hidden files are left out."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
    except EmptyDatasetError:
        raise DatasetError(f"no data files found in {folder}") from None
    data_files = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    by_split = {str(k): list(v) for k, v in data_files.items()}
    split = _pick_split(list(by_split), where=str(folder))
    return split, by_split[split]


def _folder_module(folder: Path, files: list[str]) -> tuple[str, dict[str, Any], list[str]]:
    """Builder name, its options and the files to give it.

    Images with ``metadata.*`` files, or images and no data files, make an image folder;
    otherwise data files (csv, parquet...) are the dataset, and images beside them are
    what their image column's paths point at. Archives inside the folder are left out
    on purpose: ``imagefolder`` would unpack them unchecked.
    """
    image_exts = _imagefolder_extensions()
    images = [f for f in files if Path(f).suffix.lower() in image_exts]
    metadata = [f for f in files if Path(f).name in _IMAGEFOLDER_METADATA]
    by_suffix: dict[str, list[str]] = {}
    for f in files:
        suffix = Path(f).suffix.lower()
        if suffix in _TABULAR_MODULES and Path(f).name not in _IMAGEFOLDER_METADATA:
            by_suffix.setdefault(suffix, []).append(f)
    if images and (metadata or not by_suffix):
        return "imagefolder", {}, images + metadata
    builders = {_TABULAR_MODULES[suffix][0] for suffix in by_suffix}
    if not by_suffix or len(builders) != 1 or (".tsv" in by_suffix and len(by_suffix) > 1):
        found = sorted({Path(f).suffix.lower() or Path(f).name for f in files})
        problem = "no image or data files" if not by_suffix else "mixed data file types"
        raise DatasetError(f"{folder}: {problem} (found: {', '.join(found) or 'nothing'})")
    module, kwargs = _TABULAR_MODULES[next(iter(by_suffix))]
    return module, dict(kwargs), [f for group in by_suffix.values() for f in group]


def _imagefolder_extensions() -> frozenset[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return frozenset(ext.lower() for ext in ImageFolder.EXTENSIONS)


def _load_hub(name: str, config_name: str | None, cache_dir: Path) -> _Source:
    """Load the train split (or the only split) of a Hub dataset (needs network)."""
    import datasets

    try:
        with _hub_cache_in(cache_dir / "hub"):
            download_config = datasets.DownloadConfig(cache_dir=str(cache_dir / "downloads"))
            splits = datasets.get_dataset_split_names(
                name, config_name, download_config=download_config
            )
            split = _pick_split(splits, where=name)
            dataset = datasets.load_dataset(
                name, config_name, split=split, cache_dir=str(cache_dir)
            )
    except DatasetError:
        raise
    except Exception as err:  # the Hub client raises many types; all mean "cannot load"
        raise DatasetError(
            f"could not load dataset {name!r} (not a local path; as a Hub dataset: {err})"
        ) from err
    return _Source(dataset, [cache_dir.resolve()], [cache_dir.resolve()])


@contextlib.contextmanager
def _hub_cache_in(folder: Path) -> Iterator[None]:
    """Send Hub downloads to ``folder`` for the duration.

    ``datasets`` fetches Hub files with ``huggingface_hub``, whose cache (normally
    ``~/.cache/huggingface/hub``) ignores ``cache_dir``; its location is read from
    ``huggingface_hub.constants`` at call time, so it is redirected there. The image
    paths of a Hub image folder then lie under the scratch folder too.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(folder)
    try:
        yield
    finally:
        constants.HF_HUB_CACHE = saved


def _pick_split(splits: list[str], *, where: str) -> str:
    """``train`` if there is one, else the only split; several others are ambiguous."""
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise DatasetError(f"{where}: no 'train' split and several others: {sorted(splits)}")


# -- checking columns and captions -------------------------------------------------------


def _check_columns(dataset: Any, args: DatasetArgs) -> None:
    existing = list(dataset.column_names)
    for role, column in (
        ("image_column", args.image_column),
        ("caption_column", args.caption_column),
    ):
        if column not in existing:
            raise DatasetError(
                f"dataset.{role} {column!r} is not a column of the dataset; "
                f"its columns are: {', '.join(existing)}"
            )


def _normalized_captions(values: list[Any], column: str) -> list[list[str]]:
    """Each example's captions as a non-empty list of strings (missing -> ``[""]``)."""
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append([""])
        elif isinstance(value, str):
            out.append([value])
        elif isinstance(value, (list, tuple)) and all(
            v is None or isinstance(v, str) for v in value
        ):
            out.append([v or "" for v in value] or [""])
        else:
            raise DatasetError(
                f"caption column {column!r}, example {i}: expected text or a "
                f"list of texts, got {type(value).__name__}"
            )
    if not any(_has_text(c) for c in out):
        raise DatasetError(f"caption column {column!r} has no non-empty caption")
    return out


def _has_text(captions: list[str]) -> bool:
    return any(c.strip() for c in captions)


def _as_image_column(dataset: Any, column: str) -> Any:
    """The dataset with ``column`` as undecoded images: original bytes (or a path)."""
    import datasets

    try:
        return dataset.cast_column(column, datasets.Image(decode=False))
    except Exception as err:  # pyarrow raises assorted types for impossible casts
        feature = dataset.features[column]
        raise DatasetError(
            f"image column {column!r} does not hold images ({feature}): {err}"
        ) from err


def _image_bytes(value: Any, source: _Source) -> bytes:
    """The bytes behind one undecoded image value; raises ImageRejected with a reason."""
    if value is None:
        raise ImageRejected("no image")
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        return bytes(data)
    if not path:
        raise ImageRejected("no image")
    return _read_local_image(path, source)


def _read_local_image(path: str, source: _Source) -> bytes:
    """Read an image path found in the data, only from inside the source's folders.

    Paths come from untrusted data (a csv column): they must not reach other local
    files or the network.
    """
    if "://" in path or path.startswith("hf:"):
        raise ImageRejected(f"remote image path not fetched: {path}")
    candidate = Path(path)
    tries = [candidate] if candidate.is_absolute() else [d / candidate for d in source.search]
    for attempt in tries:
        normal = Path(os.path.normpath(attempt))
        if not any(r in normal.parents for r in source.roots):
            raise ImageRejected(f"image path outside the dataset: {path}")
        if normal.is_file():
            if normal.stat().st_size > MAX_IMAGE_BYTES:
                raise ImageRejected(f"file larger than {MAX_IMAGE_BYTES} bytes: {path}")
            return normal.read_bytes()
    raise ImageRejected(f"image file not found: {path}")


# -- writing the normalized form ---------------------------------------------------------


@contextlib.contextmanager
def _scratch(work_dir: Path | None) -> Iterator[Path]:
    """A fresh scratch folder (inside ``work_dir`` if given), removed afterwards."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    path = Path(
        tempfile.mkdtemp(
            prefix="loraflow-prepare-", dir=str(work_dir) if work_dir is not None else None
        )
    )
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn ``datasets``' own progress bars off for the duration, unless wanted."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    if not enabled and was:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not datasets.is_progress_bar_enabled():
            datasets.enable_progress_bars()


def _clear_destination(fs: Any, root: str, address: str) -> None:
    """Make ``root`` an empty home for the dataset; refuse if it holds foreign files."""
    if not fs.exists(root):
        fs.makedirs(root, exist_ok=True)
        return
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    foreign = sorted(names - _OWN_NAMES)
    if foreign:
        raise DatasetError(
            f"{address} holds other files ({', '.join(foreign[:5])}); "
            "refusing to overwrite it: choose an empty or new location"
        )
    # The manifest goes first: from here on, readers no longer trust the folder.
    for name in (MANIFEST_NAME, _MANIFEST_TMP, RECORDS_NAME, IMAGES_DIR):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)


@dataclass
class _Written:
    records: list[str]
    skipped: list[dict]
    empty_captions: int


def _write_examples(
    fs: Any, root: str, source: _Source, column: str, captions: list[list[str]], *, progress: bool
) -> _Written:
    """Check every image and write the good ones; never stops on a bad image."""
    from tqdm import tqdm

    fs.makedirs(f"{root}/{IMAGES_DIR}", exist_ok=True)
    records: list[str] = []
    skipped: list[dict] = []
    empty = 0
    rows = source.dataset.select_columns([column])
    for index, row in enumerate(tqdm(rows, desc="checking images", disable=not progress)):
        try:
            data = _image_bytes(row[column], source)
            ext, width, height = _check_image(data)
        except Exception as err:  # untrusted files: PIL raises many types; skip, never crash
            skipped.append({"index": index, "reason": _reason(err)})
            continue
        file = f"{IMAGES_DIR}/{len(records):06d}{ext}"
        fs.pipe_file(f"{root}/{file}", data)
        record = {
            "file": file,
            "captions": captions[index],
            "width": width,
            "height": height,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        records.append(_canonical_json(record))
        empty += not _has_text(captions[index])
    return _Written(records, skipped, empty)


def _reason(err: Exception) -> str:
    if isinstance(err, ImageRejected):
        return str(err)
    return f"unreadable image: {type(err).__name__}: {err}"


def prepare_dataset(
    args: DatasetArgs,
    dest: str,
    *,
    work_dir: Path | None = None,
    progress: bool = False,
) -> DatasetManifest:
    """Prepare the dataset of ``args`` at ``dest`` (local path or fsspec URL).

    Idempotent: when ``dest`` already holds a valid prepared dataset of the same source,
    it is returned as is. Otherwise the source is loaded (downloads and ``datasets``
    caches go to a scratch folder under ``work_dir``, removed at the end), columns and
    captions are checked before any image work, every image is checked, and the layout
    is written with the manifest last.
    """
    if bool(args.url) == bool(args.name):
        raise DatasetError("dataset: set exactly one of 'url' and 'name'")
    address = _normal_address(dest)
    fs, root = fsspec.core.url_to_fs(address)
    source_info = source_record(args)
    existing = _read_committed(fs, root)
    if existing is not None and existing[0].get("source") == source_info:
        return _manifest_of(address, existing[0])
    with _scratch(work_dir) as work, _progress_bars(progress):
        source = _load_source(args, work, progress=progress)
        _check_columns(source.dataset, args)
        captions = _normalized_captions(
            list(source.dataset[args.caption_column]), args.caption_column
        )
        source.dataset = _as_image_column(source.dataset, args.image_column)
        _clear_destination(fs, root, address)
        written = _write_examples(fs, root, source, args.image_column, captions, progress=progress)
    _check_usable(written, args)
    manifest = _commit(
        fs, root, written, source_info, args, columns=list(source.dataset.column_names)
    )
    return _manifest_of(address, manifest)


def _check_usable(written: _Written, args: DatasetArgs) -> None:
    if not written.records:
        reasons = sorted({s["reason"] for s in written.skipped})[:5]
        raise DatasetError(
            f"no usable image in the dataset ({len(written.skipped)} skipped; "
            f"e.g. {'; '.join(reasons)})"
        )
    if written.empty_captions == len(written.records):
        raise DatasetError(
            f"caption column {args.caption_column!r} has no non-empty caption "
            "among the usable images"
        )


def _commit(
    fs: Any,
    root: str,
    written: _Written,
    source_info: dict[str, Any],
    args: DatasetArgs,
    *,
    columns: list[str],
) -> dict[str, Any]:
    """Write records.jsonl, then manifest.json (via a temporary name) as the commit."""
    records_bytes = "".join(line + "\n" for line in written.records).encode("utf-8")
    fs.pipe_file(f"{root}/{RECORDS_NAME}", records_bytes)
    manifest = {
        "format": FORMAT,
        "count": len(written.records),
        "content_hash": hashlib.sha256(records_bytes).hexdigest(),
        "source": source_info,
        "skipped": written.skipped,
        "empty_captions": written.empty_captions,
        "columns": {
            "image": args.image_column,
            "caption": args.caption_column,
            "available": columns,
        },
    }
    fs.pipe_file(f"{root}/{_MANIFEST_TMP}", json.dumps(manifest, indent=2).encode("utf-8"))
    fs.mv(f"{root}/{_MANIFEST_TMP}", f"{root}/{MANIFEST_NAME}")
    return manifest


def _normal_address(address: str) -> str:
    """URLs without a trailing slash; local paths absolute (the address travels)."""
    if "://" in address:
        return address.rstrip("/")
    return str(Path(address).expanduser().resolve())


def _manifest_of(address: str, manifest: dict[str, Any]) -> DatasetManifest:
    return DatasetManifest(
        address=address,
        count=int(manifest["count"]),
        content_hash=str(manifest["content_hash"]),
        skipped=list(manifest.get("skipped", [])),
        empty_captions=int(manifest.get("empty_captions", 0)),
    )


# -- reading -----------------------------------------------------------------------------


def _read_committed(fs: Any, root: str) -> tuple[dict[str, Any], list[dict]] | None:
    """(manifest, records) if ``root`` holds a committed, intact dataset, else None."""
    try:
        return _verified(fs, root)
    except (DatasetError, FileNotFoundError):
        return None


def _verified(fs: Any, root: str) -> tuple[dict[str, Any], list[dict]]:
    """Read and check manifest and records; raise DatasetError saying what is wrong."""
    try:
        manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST_NAME}"))
    except FileNotFoundError:
        raise DatasetError("no manifest.json (not prepared, or preparation unfinished)") from None
    except (ValueError, UnicodeDecodeError):
        raise DatasetError("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"manifest.json is not a {FORMAT} manifest")
    records_bytes = fs.cat_file(f"{root}/{RECORDS_NAME}")
    if hashlib.sha256(records_bytes).hexdigest() != manifest.get("content_hash"):
        raise DatasetError("records.jsonl does not match the manifest's content_hash")
    records = [json.loads(line) for line in records_bytes.decode("utf-8").splitlines()]
    if len(records) != manifest.get("count"):
        raise DatasetError("records.jsonl does not hold 'count' records")
    return manifest, records


def open_dataset(address: str) -> PreparedDataset:
    """Open the prepared dataset at ``address`` after checking its manifest and records."""
    address = _normal_address(address)
    fs, root = fsspec.core.url_to_fs(address)
    try:
        manifest, records = _verified(fs, root)
    except DatasetError as err:
        raise DatasetError(f"no valid prepared dataset at {address}: {err}") from None
    return PreparedDataset(address, fs, root, manifest, records)


class PreparedDataset:
    """Read access to a prepared dataset.

    Image bytes are read on first use and KEPT in memory (LoRA datasets are small), so
    later epochs never go back to storage; each is checked against its sha256 on read.
    """

    def __init__(
        self, address: str, fs: Any, root: str, manifest: dict[str, Any], records: list[dict]
    ) -> None:
        self.address = address
        self.manifest = manifest
        self._fs = fs
        self._root = root
        self._records = records
        self._bytes: dict[int, bytes] = {}

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def __len__(self) -> int:
        return len(self._records)

    def captions(self, i: int) -> list[str]:
        """All captions of example ``i`` (at least one, possibly empty)."""
        return list(self._records[i]["captions"])

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of example ``i`` as seen (EXIF orientation applied)."""
        record = self._records[i]
        return int(record["width"]), int(record["height"])

    def image_bytes(self, i: int) -> bytes:
        """The original file bytes of example ``i``, checked against its sha256."""
        cached = self._bytes.get(i)
        if cached is not None:
            return cached
        record = self._records[i]
        data = self._fs.cat_file(f"{self._root}/{record['file']}")
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise DatasetError(
                f"{self.address}/{record['file']}: content does not match "
                "its sha256 (storage corrupted or modified)"
            )
        self._bytes[i] = data
        return data

    def image(self, i: int) -> Image.Image:
        """Example ``i`` as 8-bit RGB (see :func:`decode_image`)."""
        return decode_image(self.image_bytes(i))
