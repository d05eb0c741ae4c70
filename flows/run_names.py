"""Readable flow run names: ``quickstart-2026-12-01-2315``, not Prefect's ``eager-panda``.

A person finds a run in the UI by what it trained and when: the run folder's name (or,
where the folder is named by the run itself, ``runs/{flow_run_name}``, the dataset's),
then the scheduled start in UTC to the minute. The same flow run always gets the same
name (the scheduled start does not move on a retry), which ``{flow_run_name}`` in an
output folder relies on.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from engine.store import storage

#: Placeholders ``flows.finetune.resolve_output_dir`` fills; never part of a name.
PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
#: Longest stem of a name, before the date.
STEM_CHARS = 40
FALLBACK_STEM = "finetune"


def slug(text: str) -> str:
    """Lowercase letters, digits and single dashes: safe in the UI, URLs and artifact keys."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _dataset_stem(task: Any) -> str:
    """The dataset's last path part (``loraflow/demo-shapes`` -> ``demo-shapes``), if any;
    with several subsets, the first one's."""
    def field(name: str) -> Any:
        return task.get(name) if isinstance(task, dict) else getattr(task, name, None)

    dataset = field("dataset") or (field("datasets") or [None])[0]
    if dataset is None:
        return ""
    get = dataset.get if isinstance(dataset, dict) else lambda k: getattr(dataset, k, None)
    where = get("name") or get("url") or ""
    last = str(where).rstrip("/").rsplit("/", 1)[-1]
    return slug(re.sub(r"\.(zip|tar(\.gz|\.bz2|\.xz)?|tgz)$", "", last))


def run_stem(output_dir: str, task: Any = None) -> str:
    """What the run is called before its date: the run folder's name, else the dataset's."""
    folder = storage.basename(output_dir.rstrip("/")) if output_dir else ""
    stem = "" if PLACEHOLDER.search(folder) else slug(folder)
    return (stem or _dataset_stem(task) or FALLBACK_STEM)[:STEM_CHARS].strip("-")


def readable_run_name(output_dir: str, task: Any = None, when: datetime | None = None) -> str:
    """``<stem>-YYYY-MM-DD-HHMM`` (UTC), e.g. ``quickstart-2026-12-01-2315``."""
    moment = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{run_stem(output_dir, task)}-{moment.strftime('%Y-%m-%d-%H%M')}"
