"""``loraflow tiny-model`` and ``loraflow demo-data``: the embedded models and demo data."""

from __future__ import annotations

import argparse
import json
from typing import Any

from flows.cli.subcommand import add_subcommand

TINY_MODELS = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from engine.model.embedded.tiny_models import build_tiny_model

    print(build_tiny_model(args.name, args.dir))
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from engine.model.embedded.demo_data import build_demo_data

    paths = build_demo_data(args.dir)
    print(json.dumps({k: str(v) for k, v in vars(paths).items()}, indent=2))
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``tiny-model`` and ``demo-data``."""
    p = add_subcommand(subparsers, "tiny-model", cmd_tiny_model,
                       "build a tiny random-weight model in diffusers layout",
                       example="loraflow tiny-model tiny-sd1 models/tiny-sd1")
    p.add_argument("name", choices=list(TINY_MODELS))
    p.add_argument("dir", help="output folder")

    p = add_subcommand(subparsers, "demo-data", cmd_demo_data,
                       "build the demo dataset (imagefolder, parquet, zip)",
                       example="loraflow demo-data data/demo")
    p.add_argument("dir", help="output folder")
