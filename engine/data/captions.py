"""A source's columns and captions, checked before any image work.

Captions: a string or a list of strings per example (the whole list is kept; the
trainer picks one per step). Empty or missing captions are kept as ``[""]`` (training on
some empty captions is legitimate) and counted; a caption column without a single
non-empty caption is an error.
"""

from __future__ import annotations

from typing import Any

from engine.data.errors import DatasetError
from engine.task.definition import DatasetArgs


def check_columns(dataset: Any, args: DatasetArgs) -> None:
    """Both named columns exist; else an error that lists the columns there are."""
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


def with_caption_column(dataset: Any, column: str, *, image_column: str,
                        mask_column: str | None = None) -> Any:
    """``dataset`` with an all-empty caption ``column`` for a task that captions its images
    (``captioning``), when it has no caption column at all: no column but its images
    (``image_column``) and masks (``mask_column``), as an image folder without
    ``metadata.jsonl`` (the class labels it infers from subfolders are no captions).

    A dataset with other columns and no ``column`` has its captions under another name (a
    mistyped ``dataset.caption_column``): an error listing its columns, never every caption
    silently dropped. A missing image column is left to :func:`check_columns`.
    """
    existing = list(dataset.column_names)
    if column in existing or image_column not in existing:
        return dataset
    others = [
        name for name in existing
        if name not in (image_column, mask_column) and not _is_class_label(dataset, name)
    ]
    if others:
        raise DatasetError(
            f"dataset.caption_column {column!r} is not a column of the dataset; its columns "
            f"are: {', '.join(existing)} (captioning adds an empty caption column only to a "
            "dataset without caption columns)"
        )
    return dataset.add_column(column, [""] * len(dataset))


def _is_class_label(dataset: Any, column: str) -> bool:
    """Whether ``column`` holds class labels (integers naming a class: never captions)."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    return isinstance(features.get(column), datasets.ClassLabel)


def normalized_captions(values: list[Any], column: str,
                        keep_uncaptioned: bool = False) -> list[list[str]]:
    """Each example's captions as a non-empty list of strings (missing -> ``[""]``);
    ``keep_uncaptioned`` (the task captions its images): no caption at all is no error."""
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
    if not keep_uncaptioned and not any(has_text(c) for c in out):
        raise DatasetError(f"caption column {column!r} has no non-empty caption")
    return out


def has_text(captions: list[str]) -> bool:
    """Whether one example has a caption that is not blank."""
    return any(c.strip() for c in captions)
