"""The committed JSON Schema of the task definition.

`finetune-task.schema.json` here is generated from :mod:`engine.task.definition`; regenerate it with
``python -m engine.task.schema`` after changing the model (a test fails until you do).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.task.definition import task_json_schema

SCHEMA_PATH = Path(__file__).with_name("finetune-task.schema.json")


def render_schema() -> str:
    """The schema file's exact text, as generated from the pydantic model."""
    return json.dumps(task_json_schema(), indent=2, sort_keys=False) + "\n"


def _type_text(prop: dict) -> str:
    if "anyOf" in prop:
        return " or ".join(_type_text(p) for p in prop["anyOf"])
    if "$ref" in prop:
        return "object"
    if "enum" in prop:
        return ", ".join(json.dumps(v) for v in prop["enum"])
    if prop.get("type") == "array":
        return f"list of {_type_text(prop.get('items', {}))}"
    text = str(prop.get("type", "any"))
    bounds = [f"{op} {prop[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                              ("maximum", "<="), ("exclusiveMaximum", "<"))
              if k in prop]
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def render_markdown() -> str:
    """docs/task-definition.md: every field, its type, default and meaning, from the schema."""
    schema = task_json_schema()
    defs = schema["$defs"]
    lines = [
        "# The task definition, field by field",
        "",
        "Generated from the pydantic model by `python -m engine.task.schema` "
        "(do not edit by hand).",
        "Fields whose meaning starts with *loraflow:* are loraflow additions; every other field",
        "has the name, default and meaning of the Crynux task format.",
        "",
        "| path | type | default | meaning |",
        "|---|---|---|---|",
    ]

    def walk(props: dict, required: list, prefix: str) -> None:
        for name, prop in props.items():
            path = f"{prefix}/{name}"
            ref = prop.get("$ref")
            default = "required" if name in required else json.dumps(prop.get("default"))
            desc = prop.get("description", "").replace("|", "\\|")
            lines.append(f"| `{path}` | {_type_text(prop)} | {default} | {desc} |")
            if ref:
                sub = defs[ref.split("/")[-1]]
                walk(sub.get("properties", {}), sub.get("required", []), path)

    walk(schema["properties"], schema.get("required", []), "")
    return "\n".join(lines) + "\n"


MARKDOWN_PATH = Path(__file__).resolve().parents[3] / "docs" / "task-definition.md"
