"""Regenerate the committed JSON Schema: ``python -m engine.schema``."""

from engine.schema import SCHEMA_PATH, render_schema

SCHEMA_PATH.write_text(render_schema())
print(f"wrote {SCHEMA_PATH}")
