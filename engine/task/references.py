"""Check what a valid task refers to, its dataset and its model, without loading either.

Why: a document can be perfect and still name a dataset folder that is not there, an
empty one, a caption column the data does not have, or a model folder without
``model_index.json``; ``run`` then fails half a minute in, after the work it did first.
:func:`reference_problems` looks in seconds and lists every such problem by JSON pointer,
as the document's own checks do. ``loraflow validate --check-refs`` runs it, and
``loraflow segment`` runs it before any work.

What is looked at, and what is left to the run:

* model (and ``model.vae``): an embedded id is fine; a local folder must hold
  ``model_index.json`` of a supported family and the component folders that family needs;
  a Hub id must be in the local cache or answer one request (:mod:`engine.model.hub`).
  No weight is read.
* dataset: a local folder or file must exist, hold data files, and have both named
  columns (read from the file headers by ``datasets`` in streaming mode: one row at most,
  nothing prepared, nothing cached); a Hub dataset must answer one request; an archive
  URL that is a local file must exist (other URLs are left to the download). Captions and
  images are not read: an image that does not decode is skipped at preparation, and
  "no usable image" is still found only then.
* a dataset already prepared under ``prepared_in`` stands in for its source: the run
  uses that copy, so a source gone since is not a problem. Its address is the one
  preparation computes (:func:`engine.data.prepared.subset_address`), never a copy of it.
* a task with ``captioning`` needs no caption column: preparation adds an empty one when
  the source has none (:func:`engine.data.prepared.keeps_uncaptioned`), and the caption
  step fills it.
"""

from __future__ import annotations

import json
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from engine.data.caption_files import is_caption_folder
from engine.data.errors import DatasetError
from engine.model import hub
from engine.model.embedded.registry import EMBEDDED_MODELS, is_embedded
from engine.task.definition import DatasetArgs, TaskDefinition
from engine.task.validation import Problem, TaskValidationError


def check_references(task: TaskDefinition, *, prepared_in: str | None = None,
                     source: str = "task") -> None:
    """Raise :class:`TaskValidationError` (exit code 2) listing every reference problem."""
    problems = reference_problems(task, prepared_in=prepared_in)
    if problems:
        raise TaskValidationError(problems, source)


def reference_problems(task: TaskDefinition, *, prepared_in: str | None = None) -> list[Problem]:
    """Every problem with the task's model and dataset references; [] when all can be had."""
    from engine.data.prepared import keeps_uncaptioned

    problems = _model_problems(task)
    captioned = keeps_uncaptioned(task)
    for where, args in subset_pointers(task):
        if not (prepared_in and _is_prepared(args, task, prepared_in)):
            problems += _dataset_problems(args, where, needs_captions=not captioned)
    return problems


def subset_pointers(task: TaskDefinition) -> list[tuple[str, DatasetArgs]]:
    """(JSON pointer, arguments) of each subset: ``/dataset``, or ``/datasets/<i>``."""
    if task.datasets is None:
        return [("/dataset", task.subsets[0])]
    return [(f"/datasets/{i}", args) for i, args in enumerate(task.datasets)]


# -- the model -----------------------------------------------------------------------------


def _model_problems(task: TaskDefinition) -> list[Problem]:
    model = task.model
    problems = []
    reason = _model_folder_reason(model.name, model.revision, with_vae=model.vae is None)
    if reason:
        problems.append(Problem("/model/name", f"model {model.name!r} {reason}"))
    if model.vae is not None:
        reason = _vae_reason(model.vae)
        if reason:
            problems.append(Problem("/model/vae", f"VAE {model.vae!r} {reason}"))
    return problems


def _model_folder_reason(name: str, revision: str, *, with_vae: bool) -> str | None:
    if name in EMBEDDED_MODELS:
        return None
    folder = Path(name).expanduser()
    if not folder.exists():
        return hub.model_unavailable(name, "model_index.json", revision)
    if not folder.is_dir():
        return "is a file; a diffusers model folder (with model_index.json) is needed"
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return ("has no model_index.json: it is not a diffusers-format model folder "
                "(a single .safetensors or .ckpt file must be converted first)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"has an unreadable model_index.json: {exc}"
    if not isinstance(index, dict):
        return "has a model_index.json that is not a JSON object"
    return _components_reason(folder, index, with_vae=with_vae)


def _components_reason(folder: Path, index: dict[str, Any], *, with_vae: bool) -> str | None:
    """The family is supported and the folders its loading opens are there."""
    from engine.model.family import UnsupportedModelError, detect_family

    try:
        family = detect_family(index, {}, {})
    except UnsupportedModelError as exc:
        return f"cannot be trained: {exc}"
    needed = ["unet", "scheduler", *(["vae"] if with_vae else [])]
    needed += [part for pair in family.text_encoders for part in pair]
    missing = [part for part in needed if not (folder / part).is_dir()]
    if missing:
        return f"lacks the component folder(s) {', '.join(missing)}"
    return None


def _vae_reason(name: str) -> str | None:
    folder = Path(name).expanduser()
    if not folder.exists():
        return hub.model_unavailable(name, "config.json", None)
    if not (folder / "config.json").is_file():
        return "has no config.json: it is not a diffusers-format VAE folder"
    return None


# -- the dataset ---------------------------------------------------------------------------


def _is_prepared(args: DatasetArgs, task: TaskDefinition, root: str) -> bool:
    """True when a committed, intact copy of this source is prepared under ``root``, at the
    very address preparation gives it (:func:`engine.data.prepared.subset_address`: the
    subset's buckets, uncaptioned images kept for ``captioning``)."""
    from engine.data.layout import read_committed
    from engine.data.prepared import subset_address

    return read_committed(subset_address(args, task, root)) is not None


def _dataset_problems(args: DatasetArgs, where: str = "/dataset", *,
                      needs_captions: bool = True) -> list[Problem]:
    """``needs_captions`` False (a task with ``captioning``): a source without the caption
    column is no problem, as preparation adds an empty one for the caption step to fill."""
    if args.shards:
        return [Problem(f"{where}/shards/{i}", reason)
                for i, reason in enumerate(map(_shard_reason, args.shards)) if reason]
    if args.url:
        reason = _archive_reason(args.url)
        return [Problem(f"{where}/url", reason)] if reason else []
    name = args.name or ""
    if is_embedded(name):
        from engine.model.embedded.registry import resolve_dataset

        local = Path(resolve_dataset(name))
    else:
        local = Path(name).expanduser()
    if not local.exists():
        reason = hub.dataset_unavailable(name)
        return [Problem(f"{where}/name", f"dataset {name!r} {reason}")] if reason else []
    if local.is_dir() and is_caption_folder(local, args.caption_extension):
        return []  # images + caption files: its columns are named as the task names them
    try:
        columns = local_columns(local)
    except DatasetError as exc:
        return [Problem(f"{where}/name", str(exc))]
    section = where.lstrip("/").replace("/", ".")
    return [
        Problem(f"{where}/{role}", f"{section}.{role} {column!r} is not a column of the "
                                   f"dataset; its columns are: {', '.join(columns)}")
        for role, column in (("image_column", args.image_column),
                             ("caption_column", args.caption_column))
        if column not in columns and (needs_captions or role == "image_column")
    ]


def _shard_reason(shard: str) -> str | None:
    """A local shard without a brace pattern must exist; patterns and URLs are left to
    the run, which lists them."""
    if "{" in shard or ("://" in shard and not shard.startswith("file://")):
        return None
    return _archive_reason(shard) and f"no such shard file: {shard}"


def _archive_reason(url: str) -> str | None:
    """A local archive (a path or ``file://`` URL) must exist; other URLs are not fetched."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        path = Path(urllib.request.url2pathname(parts.path))
    elif "://" not in url:
        path = Path(url).expanduser()
    else:
        return None
    if not path.is_file():
        return f"no such archive file: {path}"
    return None


def local_columns(path: Path) -> list[str]:
    """The column names a local dataset (folder or file) loads with, reading one row at most.

    The same choice of builder and files as preparation makes (``engine.data.sources``),
    loaded in streaming mode, so the columns are the ones preparation will see.
    """
    import datasets

    from engine.data.sources import _folder_module, _local_split_files, _tabular_module

    path = path.resolve()
    if path.is_file():
        module, kwargs = _tabular_module(path)
        split, files = "train", [str(path)]
    else:
        split, files = _local_split_files(path)
        module, kwargs, files = _folder_module(path, files)
    with tempfile.TemporaryDirectory(prefix="loraflow-refs-") as scratch:
        try:
            stream = datasets.load_dataset(module, data_files={split: files}, split=split,
                                           streaming=True, cache_dir=scratch, **kwargs)
            if stream.column_names is not None:
                return list(stream.column_names)
            first = next(iter(stream), None)
        except (ValueError, TypeError, OSError,
                datasets.exceptions.DatasetGenerationError) as err:
            cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
            raise DatasetError(f"could not load {path} as {module}: {err}{cause}") from err
    if first is None:
        raise DatasetError(f"{path} has no rows")
    return list(first)

