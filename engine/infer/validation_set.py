"""The validation set: which images are rendered at each validated step, and how.

A validation set is given as a prompts file (one prompt per line) or a dataset file (csv,
json, jsonl, parquet, arrow) with a ``prompt`` column and optional ``negative_prompt``,
``seed``, ``width`` / ``height`` (or ``size``: ``512``, ``"768x512"``), ``steps``,
``guidance_scale`` and ``image`` (a path relative to the file; the held-out loss of
:mod:`engine.infer.validation_loss` uses these images with their prompts). Without a
file, the set is what the final validation renders: ``validation.prompt`` or captions
drawn from the training data by the task's seed.

Every file is read through :mod:`engine.store.storage` (a path or any fsspec URL) and
parsed as data only: no pickle, nothing evaluated. A file that cannot be used is refused
with a :class:`ValidationSetError` naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any

from engine.errors import LoraflowError
from engine.store import storage
from engine.task.definition import TaskDefinition

#: A validation set file larger than this is refused (it holds prompts, not images).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Rows rendered at each validated step, at most (each costs a full denoising run).
MAX_ITEMS = 64
#: The columns a dataset file may have; any other is refused (a typo must not be ignored).
COLUMNS = frozenset({"prompt", "negative_prompt", "seed", "width", "height", "size", "steps",
                     "guidance_scale", "image"})
DATASET_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".arrow")


class ValidationSetError(LoraflowError, ValueError):
    """A validation set file that cannot be used: the message names file, row and column."""


@dataclass(frozen=True)
class ValidationItem:
    """One validation image to render, every setting filled in (no defaults left open).

    ``seed`` is the row's own seed when the file gives one (then the image depends on it
    alone), else None: the image is drawn by (task seed, row index), as the final
    validation's images are. ``image`` is the row's reference image URL, if any.
    """

    prompt: str
    negative_prompt: str | None
    seed: int | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    image: str | None = None

    def describe(self, task_seed: int) -> dict[str, Any]:
        """The item as JSON (what ``prompts.json`` of a validated step lists)."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "seed": self.seed if self.seed is not None else task_seed,
                "width": self.width, "height": self.height, "steps": self.steps,
                "guidance_scale": self.guidance_scale}


# -- reading files --------------------------------------------------------------------


def _read(url: str, what: str) -> bytes:
    try:
        data = storage.read_bytes(url, limit=MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ValidationSetError(f"{what} {storage.redact(url)} does not exist") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValidationSetError(
            f"{what} {storage.redact(url)} is larger than {MAX_FILE_BYTES // 2**20} MiB"
        )
    return data


def read_prompts_file(url: str) -> list[str]:
    """The prompts of a text file: one per line, blank lines and ``#`` comments skipped."""
    try:
        text = _read(url, "validation.prompts_file").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationSetError(
            f"validation.prompts_file {storage.redact(url)} is not UTF-8 text ({exc.reason})"
        ) from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValidationSetError(f"validation.prompts_file {storage.redact(url)} has no prompt")
    return prompts


def _table_rows(data: bytes, suffix: str, where: str) -> list[dict[str, Any]]:
    """Rows of a csv / json / jsonl / parquet / arrow file as plain dicts."""
    try:
        if suffix == ".csv":
            return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
        if suffix == ".jsonl":
            return [json.loads(line) for line in data.decode("utf-8-sig").splitlines()
                    if line.strip()]
        if suffix == ".json":
            document = json.loads(data.decode("utf-8-sig"))
            if isinstance(document, dict) and isinstance(document.get("data"), list):
                document = document["data"]  # {"data": [...]}, as finetrainers' files are
            if not isinstance(document, list):
                raise ValidationSetError(f"{where}: a JSON validation set is a list of "
                                         "objects (or {\"data\": [...]})")
            return document
        import pyarrow as pa

        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(pa.BufferReader(data)).to_pylist()
        try:  # the arrow IPC file format, else the stream format (datasets writes it)
            return pa.ipc.open_file(pa.BufferReader(data)).read_all().to_pylist()
        except pa.ArrowInvalid:
            return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()
    except ValidationSetError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, OSError, ValueError) as exc:
        raise ValidationSetError(f"{where} cannot be read as {suffix[1:]}: {exc}") from None


def _number(row: dict[str, Any], column: str, kind: type, where: str) -> Any:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ValidationSetError(f"{where}, column {column!r}: {value!r} is not a number") from None
    if kind is int and float(value) != number:
        raise ValidationSetError(f"{where}, column {column!r}: {value!r} is not a whole number")
    if kind is float and not math.isfinite(number):
        raise ValidationSetError(f"{where}, column {column!r}: {value!r} is not finite")
    return number


def _size(row: dict[str, Any], where: str) -> tuple[int | None, int | None]:
    """(width, height) from width/height, or size (``512`` or ``"768x512"``)."""
    width, height = _number(row, "width", int, where), _number(row, "height", int, where)
    size = row.get("size")
    if size not in (None, ""):
        if width is not None or height is not None:
            raise ValidationSetError(f"{where}: give size or width/height, not both")
        text = str(size).lower().replace(" ", "")
        parts = text.split("x") if "x" in text else [text, text]
        try:
            width, height = (int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            raise ValidationSetError(
                f"{where}, column 'size': {size!r} is not WIDTHxHEIGHT or one number"
            ) from None
    for column, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise ValidationSetError(
                f"{where}, column {column!r}: {value} is not a positive multiple of 8"
            )
    return width, height


def _item(row: Any, index: int, url: str, task: TaskDefinition) -> ValidationItem:
    where = f"validation.dataset_file {storage.redact(url)}, row {index}"
    if not isinstance(row, dict):
        raise ValidationSetError(f"{where}: a row is an object with a prompt, got {row!r}")
    unknown = sorted(set(row) - COLUMNS)
    if unknown:
        raise ValidationSetError(
            f"{where}: unknown column(s) {unknown}; known: {sorted(COLUMNS)}"
        )
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValidationSetError(f"{where}, column 'prompt': a non-empty prompt is needed")
    negative = row.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValidationSetError(f"{where}, column 'negative_prompt': not text")
    width, height = _size(row, where)
    steps = _number(row, "steps", int, where)
    if steps is not None and not 1 <= steps <= 1000:
        raise ValidationSetError(f"{where}, column 'steps': {steps} is not in 1..1000")
    guidance = _number(row, "guidance_scale", float, where)
    if guidance is not None and not 0 <= guidance <= 100:
        raise ValidationSetError(f"{where}, column 'guidance_scale': {guidance} not in 0..100")
    image = row.get("image") or None
    if image is not None:
        image = _image_url(url, str(image), where)
    v, size = task.validation, task.train_args.resolution
    return ValidationItem(
        prompt=prompt.strip(), negative_prompt=negative or None,
        seed=_number(row, "seed", int, where), width=width or size, height=height or size,
        steps=steps or v.num_inference_steps,
        guidance_scale=v.guidance_scale if guidance is None else guidance, image=image,
    )


def _image_url(file_url: str, image: str, where: str) -> str:
    """A row's image, relative to the dataset file's folder; never outside it."""
    if "://" in image or image.startswith("/") or ".." in posixpath.normpath(image).split("/"):
        raise ValidationSetError(
            f"{where}, column 'image': {image!r} must be a path relative to the file's "
            "folder, inside it"
        )
    folder = file_url.rstrip("/").rsplit("/", 1)[0] if "/" in file_url else "."
    return storage.join(folder, posixpath.normpath(image))


def read_dataset_file(url: str, task: TaskDefinition) -> list[ValidationItem]:
    """Every row of a validation dataset file, checked and filled with the task's defaults."""
    suffix = posixpath.splitext(url.split("?", 1)[0].lower())[1]
    if suffix not in DATASET_SUFFIXES:
        raise ValidationSetError(
            f"validation.dataset_file {storage.redact(url)}: unknown format {suffix or '(none)'}"
            f"; give one of {', '.join(DATASET_SUFFIXES)}"
        )
    where = f"validation.dataset_file {storage.redact(url)}"
    rows = _table_rows(_read(url, "validation.dataset_file"), suffix, where)
    if not rows:
        raise ValidationSetError(f"{where} has no rows")
    if len(rows) > MAX_ITEMS:
        raise ValidationSetError(f"{where} has {len(rows)} rows; at most {MAX_ITEMS} are "
                                 "rendered at each validated step")
    return [_item(row, i, url, task) for i, row in enumerate(rows)]


# -- the set of a task ----------------------------------------------------------------


def _plain(task: TaskDefinition, prompt: str) -> ValidationItem:
    v, size = task.validation, task.train_args.resolution
    return ValidationItem(prompt=prompt, negative_prompt=None, seed=None, width=size,
                          height=size, steps=v.num_inference_steps,
                          guidance_scale=v.guidance_scale)


def validation_items(task: TaskDefinition, dataset: Any) -> list[ValidationItem]:
    """What each validated step renders: the dataset file's rows, the prompts file's lines,
    or the final validation's prompts (``validation.prompt`` or captions by seed)."""
    v = task.validation
    if v.dataset_file is not None:
        return read_dataset_file(v.dataset_file, task)
    if v.prompts_file is not None:
        prompts = read_prompts_file(v.prompts_file)
        if len(prompts) > MAX_ITEMS:
            raise ValidationSetError(
                f"validation.prompts_file has {len(prompts)} prompts; at most {MAX_ITEMS}"
            )
        return [_plain(task, p) for p in prompts]
    from engine.infer.validation import validation_prompts

    return [_plain(task, p) for p in validation_prompts(task, dataset)]


def schedule_problems(task: TaskDefinition) -> list[tuple[str, str]]:
    """(JSON pointer, message) for validation settings that cannot work together.

    A validated step needs a committed checkpoint at that very step. Segments commit at
    their end (anywhere, when a budget stops them) and, with ``checkpointing_steps``, at
    every multiple of it; so ``validation_steps`` must be a multiple of
    ``checkpointing_steps``, and no in-segment checkpoint may be deleted before it is
    rendered (``checkpoints_total_limit``).
    """
    v, ta = task.validation, task.train_args
    problems = []
    given = [name for name in ("prompt", "prompts_file", "dataset_file")
             if getattr(v, name) is not None]
    if len(given) > 1:
        problems.append((f"/validation/{given[1]}",
                         f"give one of {' / '.join(given)}, not several"))
    if v.validation_steps is not None:
        every = ta.checkpointing_steps
        if every is None or v.validation_steps % every:
            problems.append((
                "/validation/validation_steps",
                f"{v.validation_steps} must be a multiple of train_args.checkpointing_steps "
                f"({every}): a validated step is rendered from the checkpoint committed at "
                "that step, outside the segment's time budget",
            ))
        if ta.checkpoints_total_limit is not None:
            problems.append((
                "/train_args/checkpoints_total_limit",
                "cannot be used with validation.validation_steps: in-segment checkpoints "
                "would be deleted before they are validated",
            ))
    return problems
