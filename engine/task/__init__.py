"""The task definition: the pydantic model, its validation, version migration and JSON Schema."""
