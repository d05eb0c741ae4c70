"""What names a dataset source: the record kept in its manifest, and the address it gets.

The same source is prepared once and found again: its address is a hash of the
credential-free source record (:func:`source_record`), and a prepared dataset whose
manifest holds the same record is reused as is.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from engine.data.buckets import Bucket
from engine.store.redact import redact_url
from engine.task.definition import DatasetArgs

#: Name of the demo dataset that is drawn locally instead of downloaded.
DEMO_DATASET_NAME = "loraflow/demo-shapes"


def source_record(
    args: DatasetArgs, buckets: tuple[Bucket, ...] | None = None,
    keep_uncaptioned: bool = False,
) -> dict[str, Any]:
    """The source as recorded in the manifest and hashed into addresses: the DatasetArgs
    as a dict, with credentials removed from the URL (user:password, signatures, tokens).

    ``buckets``: the bucket list the records were assigned to (each record's ``bucket``),
    kept as ``"bucket_list": [[w, h], ...]`` (``buckets`` is the DatasetArgs' own
    settings, already in the record when set); None (no bucketing) adds nothing, so the
    record, and the address, of a task without buckets is what it always was.
    """
    record = args.stable_dump(mode="json")
    if buckets is not None:
        record["bucket_list"] = [[int(b.width), int(b.height)] for b in buckets]
    if keep_uncaptioned:  # uncaptioned images kept (for the caption step): other records
        record["keep_uncaptioned"] = True
    if record.get("url"):
        record["url"] = redact_url(record["url"])
    if record.get("name") == DEMO_DATASET_NAME:
        from engine.model.embedded.demo_data import DEMO_DATA_VERSION

        record["demo_data_version"] = DEMO_DATA_VERSION
    return record


def default_dataset_address(
    args: DatasetArgs, root: str, buckets: tuple[Bucket, ...] | None = None,
    keep_uncaptioned: bool = False,
) -> str:
    """Where the dataset of ``args`` is prepared under ``root``: ``{root}/dataset-{hash}``.

    The hash covers the whole (credential-free) source record, including the column
    names, so the same source is prepared once and found again; note that a local folder
    whose files change keeps its address (prepare into a new root to pick changes up).
    """
    record = source_record(args, buckets, keep_uncaptioned)
    digest = hashlib.sha256(canonical_json(record).encode()).hexdigest()
    return f"{root.rstrip('/')}/dataset-{digest[:16]}"


def canonical_json(value: Any) -> str:
    """One spelling of ``value`` as JSON (sorted keys, no spaces): what gets hashed."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
