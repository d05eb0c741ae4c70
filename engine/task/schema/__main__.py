"""Regenerate the committed JSON Schema and its markdown page: ``python -m engine.task.schema``."""

from engine.task.schema import MARKDOWN_PATH, SCHEMA_PATH, render_markdown, render_schema

SCHEMA_PATH.write_text(render_schema())
print(f"wrote {SCHEMA_PATH}")
if MARKDOWN_PATH.parent.parent.joinpath("pyproject.toml").exists():  # a source checkout
    MARKDOWN_PATH.parent.mkdir(exist_ok=True)
    MARKDOWN_PATH.write_text(render_markdown())
    print(f"wrote {MARKDOWN_PATH}")
