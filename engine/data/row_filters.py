"""A task's metadata filters applied to a loaded source's rows, before any image work.

Filters (``DatasetArgs.filters``, judged by :mod:`engine.data.filters`) name columns of a
tabular source or of an image folder's ``metadata.*`` file (dots reach into struct
columns). Only the columns they name are read, never the image column, so filtering a
large parquet file decodes nothing. A null value counts as missing (the filter's
``missing`` decides): a table cannot tell an absent key from a null one, since arrow gives
every row of a struct column every key. Rows left out are only counted (the manifest's
``filtered_out``): a filter that keeps 1,000 of 100,000 rows is working, not failing.
"""

from __future__ import annotations

from typing import Any

from engine.data.errors import DatasetError
from engine.data.filters import passes
from engine.data.sources import Source
from engine.task.definition import FilterArgs


def apply_filters(source: Source, filters: list[FilterArgs], image_column: str) -> int:
    """Keep only the source's rows that pass every filter; the number left out.

    The kept rows keep their source row numbers (``source.rows``), and the rows known bad
    (``rejected``) and the rows' extras follow them. No filters: nothing changes.
    """
    if not filters:
        return 0
    dataset = source.dataset
    wanted = {f.field.split(".", 1)[0] for f in filters}
    columns = [c for c in dataset.column_names if c in wanted and c != image_column]
    values = dataset.select_columns(columns).to_dict() if columns else {}
    kept = []
    for i in range(len(dataset)):
        row = _present({c: values[c][i] for c in columns})
        if passes(row, filters, where=f"row {source.source_row(i)}"):
            kept.append(i)
    if not kept:
        raise DatasetError(
            f"dataset.filters left out every one of the {len(dataset)} rows; "
            "loosen them or check the field names (columns: "
            f"{', '.join(c for c in dataset.column_names if c != image_column)})"
        )
    if len(kept) == len(dataset):
        return 0
    position = {old: new for new, old in enumerate(kept)}
    # keep_in_memory: a save_to_disk source would otherwise get an index file in its folder
    source.dataset = dataset.select(kept, keep_in_memory=True)
    source.rejected = {position[i]: r for i, r in source.rejected.items() if i in position}
    source.extras = {position[i]: e for i, e in source.extras.items() if i in position}
    source.rows = [source.source_row(i) for i in kept]
    return len(dataset) - len(kept)


def _present(value: Any) -> Any:
    """``value`` with null entries of mappings removed, at every depth."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    return value
