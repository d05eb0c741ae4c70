"""The committed JSON Schema of the task definition.

`finetune-task.schema.json` here is generated from :mod:`engine.task`; regenerate it with
``python -m engine.schema`` after changing the model (a test fails until you do).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.task import task_json_schema

SCHEMA_PATH = Path(__file__).with_name("finetune-task.schema.json")


def render_schema() -> str:
    """The schema file's exact text, as generated from the pydantic model."""
    return json.dumps(task_json_schema(), indent=2, sort_keys=False) + "\n"
