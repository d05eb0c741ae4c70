"""Where a dataset's rows come from: an image folder, tabular files, an archive, the Hub.

Sources come in many shapes (an image folder with ``metadata.jsonl``, an image folder
with same-named caption files (:mod:`engine.data.caption_files`), parquet/csv/json/arrow
files, a ``datasets`` save_to_disk folder, an archive behind a URL, a Hub dataset), may be
untrusted, and may be slow or gone later. :func:`load_source` loads one with ``datasets``
into a :class:`Source`, and :func:`image_bytes` gives the bytes behind one row's image,
reading image paths found in the data only from inside the source's own folders.

Everything lands in a scratch folder (downloads, extracted archives, ``datasets``' arrow
cache, Hub files), never in ``~/.cache``; the caller removes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data import archive_extract, archive_fetch
from engine.data.archive_members import detect_format
from engine.data.caption_files import is_caption_folder, load_caption_folder
from engine.data.errors import ArchiveError, DatasetError
from engine.data.identity import DEMO_DATASET_NAME
from engine.data.images import MAX_IMAGE_BYTES, ImageRejected
from engine.data.masks import is_mask_file, without_mask_files
from engine.task.definition import DatasetArgs

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


@dataclass
class Source:
    """A loaded source split, and where the image paths found in its data may lead.

    ``roots``: folders a path must stay inside. ``search``: folders a relative path is
    tried against (the source folder, then the folders of its data files).
    ``rejected``: rows known bad before any image work (row -> reason; a caption folder's
    image without its caption file). ``extras``: row -> fields its prepared record gets
    besides the usual ones (a kohya folder's ``repeats``). ``report``: what the manifest
    records about the source beyond its rows (a caption folder's empty caption files).
    ``rows``: the source row each dataset row is (None: the same; set once filters left
    rows out), so a skipped image is reported by its row in the source.
    """

    dataset: Any  # datasets.Dataset
    roots: list[Path]
    search: list[Path]
    rejected: dict[int, str] = field(default_factory=dict)
    extras: dict[int, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    rows: list[int] | None = None

    def source_row(self, index: int) -> int:
        """The row of the source split that dataset row ``index`` is."""
        return index if self.rows is None else self.rows[index]


def load_source(args: DatasetArgs, work: Path, *, progress: bool,
                keep_uncaptioned: bool = False) -> Source:
    """Load the train split of the source ``args`` names; downloads go under ``work``.

    ``keep_uncaptioned``: a caption folder's image without a caption file is a row with an
    empty caption, not a rejected one (the task captions its images)."""
    cache_dir = work / "hf-cache"
    if args.url:
        downloaded = archive_fetch.fetch(args.url, work / "download", progress=progress)
        try:
            extracted = archive_extract.extract(downloaded, work / "extracted")
        except ArchiveError as err:
            raise DatasetError(f"dataset archive refused: {err}") from err
        downloaded.unlink()  # free the disk: only the extracted files are used
        return _load_local(archive_extract.dataset_root(extracted), cache_dir, args,
                           keep_uncaptioned)
    name = args.name or ""
    if name == DEMO_DATASET_NAME:
        from engine.model.embedded.demo_data import build_demo_data

        return _load_local(build_demo_data(work / "demo").imagefolder, cache_dir, args,
                           keep_uncaptioned)
    local = Path(name).expanduser()
    if local.exists():
        return _load_local(local, cache_dir, args, keep_uncaptioned)
    return _load_hub(name, args.config_name, cache_dir)


# -- local folders and files -------------------------------------------------------------


def _load_local(path: Path, cache_dir: Path, args: DatasetArgs,
                keep_uncaptioned: bool = False) -> Source:
    """Load a local folder (image folder, caption folder, save_to_disk folder, or tabular
    files) or a single tabular file."""
    import datasets

    path = path.resolve()
    if path.is_dir() and _is_saved_dataset(path):
        return _load_saved(path)
    if path.is_dir() and is_caption_folder(path, args.caption_extension):
        return _load_caption_folder(path, args, keep_uncaptioned)
    if path.is_file():
        module, kwargs = _tabular_module(path)
        files, split, root = [str(path)], "train", path.parent
    else:
        split, files = _local_split_files(path)
        files = without_mask_files(files, args)  # masks beside images are not examples
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
    return Source(dataset, [root], search)


def _load_caption_folder(folder: Path, args: DatasetArgs,
                         keep_uncaptioned: bool = False) -> Source:
    """An image folder with same-named caption files, as rows named as the task says."""
    import datasets

    rows = load_caption_folder(folder, args.caption_extension,
                               skip=is_mask_file if args.masks == "beside" else None,
                               keep_uncaptioned=keep_uncaptioned)
    features = datasets.Features({
        args.image_column: datasets.Image(decode=False),
        args.caption_column: datasets.Sequence(datasets.Value("string")),
    })
    dataset = datasets.Dataset.from_dict(
        {
            args.image_column: [{"bytes": None, "path": p} for p in rows.images],
            args.caption_column: rows.captions,
        },
        features=features,
    )
    return Source(
        dataset,
        [folder],
        [folder],
        rejected=rows.rejected,
        extras={row: {"repeats": n} for row, n in rows.repeats.items()},
        report={"caption_files": rows.report},
    )


# -- datasets' save_to_disk folders ------------------------------------------------------

_SAVED_FILES = ("dataset_info.json", "state.json")


def _is_saved_dataset(folder: Path) -> bool:
    """A ``Dataset.save_to_disk`` folder, or a ``DatasetDict``'s (``dataset_dict.json``)."""
    return all((folder / n).is_file() for n in _SAVED_FILES) or (
        folder / "dataset_dict.json"
    ).is_file()


def _load_saved(folder: Path) -> Source:
    """Load a save_to_disk folder in place: its arrow files, memory-mapped, nothing else.

    ``datasets`` reads the two json files and the arrow files that ``state.json`` lists
    (no pickle); each listed file is checked to lie inside the folder first. A
    ``DatasetDict`` folder gives its train split (or its only one).
    """
    import json

    import datasets

    where = folder
    if not all((folder / n).is_file() for n in _SAVED_FILES):
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{folder}/dataset_dict.json is not readable: {err}") from None
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise DatasetError(f"{folder}/dataset_dict.json: 'splits' is not a list of names")
        split = _pick_split(splits, where=str(folder))
        where = _inside_folder(folder, split, folder)
        if not all((where / n).is_file() for n in _SAVED_FILES):
            raise DatasetError(f"{where}: split {split!r} has no {' and '.join(_SAVED_FILES)}")
    try:
        state = json.loads((where / "state.json").read_text())
        names = [str(f["filename"]) for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{where}/state.json is not a datasets state file: {err}") from None
    for name in names:
        if not _inside_folder(where, name, folder).is_file():
            raise DatasetError(f"{where}/state.json lists {name!r}, which is not in the folder")
    try:
        dataset = datasets.load_from_disk(str(where), keep_in_memory=False)
    except (ValueError, TypeError, OSError, KeyError) as err:
        raise DatasetError(f"could not load {where} as a save_to_disk folder: {err}") from err
    return Source(dataset, [folder], [where, folder])


def _inside_folder(base: Path, name: str, root: Path) -> Path:
    """``base / name``, refused when it leads outside ``root`` (links resolved)."""
    path = (base / name).resolve()
    if root != path and root not in path.parents:
        raise DatasetError(f"{base}: {name!r} leads outside the dataset folder")
    return path


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
        detect_format(path)
    except (ArchiveError, OSError):
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


# -- the Hub -----------------------------------------------------------------------------


def _load_hub(name: str, config_name: str | None, cache_dir: Path) -> Source:
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
    return Source(dataset, [cache_dir.resolve()], [cache_dir.resolve()])


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


# -- one row's image ---------------------------------------------------------------------


def as_image_column(dataset: Any, column: str) -> Any:
    """The dataset with ``column`` as undecoded images: original bytes (or a path)."""
    import datasets

    try:
        return dataset.cast_column(column, datasets.Image(decode=False))
    except Exception as err:  # pyarrow raises assorted types for impossible casts
        feature = dataset.features[column]
        raise DatasetError(
            f"image column {column!r} does not hold images ({feature}): {err}"
        ) from err


def image_bytes(value: Any, source: Source) -> bytes:
    """The bytes behind one undecoded image value; raises ImageRejected with a reason."""
    if value is None:
        raise ImageRejected("no image")
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        return bytes(data)
    if not path:
        raise ImageRejected("no image")
    return _read_local_image(path, source)


def image_name(value: Any, source: Source) -> str | None:
    """The file name of one undecoded image value, for reports; None when it has none.

    A relative path is kept as the data wrote it; an absolute one inside the source's
    folders becomes relative to them, any other path or URL its last part. Never an
    absolute local path: the scratch folder an archive was unpacked into is not a name
    a user knows, and a report must not change from run to run.
    """
    path = value.get("path") if isinstance(value, dict) else None
    if not path or not isinstance(path, str):
        return None
    if "://" not in path and not path.startswith("hf:"):
        candidate = Path(path)
        if not candidate.is_absolute():
            return candidate.as_posix()
        normal = Path(os.path.normpath(candidate))
        for root in source.roots:
            if root in normal.parents:
                return normal.relative_to(root).as_posix()
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or None


def _read_local_image(path: str, source: Source) -> bytes:
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
