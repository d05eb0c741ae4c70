"""Embedded defaults: tiny random-weight SD models and a demo dataset, built locally.

Why: loraflow must run end to end (tests, demos, CI) with no network and no Hugging Face
Hub; the ids in ``registry`` (``loraflow/tiny-sd1``, ``loraflow/demo-shapes``, ...) stand
in for Hub ids and resolve to folders built here on first use.
"""

from engine.model.embedded.demo_data import DemoDataPaths, build_demo_data
from engine.model.embedded.registry import (
    EMBEDDED_DATASETS,
    EMBEDDED_MODELS,
    demo_data_paths,
    is_embedded,
    loraflow_home,
    resolve_dataset,
    resolve_model,
)
from engine.model.embedded.tiny_models import TINY_MODEL_NAMES, build_tiny_model

__all__ = [
    "EMBEDDED_DATASETS",
    "EMBEDDED_MODELS",
    "TINY_MODEL_NAMES",
    "DemoDataPaths",
    "build_demo_data",
    "build_tiny_model",
    "demo_data_paths",
    "is_embedded",
    "loraflow_home",
    "resolve_dataset",
    "resolve_model",
]
