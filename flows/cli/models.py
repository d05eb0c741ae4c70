"""``loraflow tiny-model`` and ``loraflow demo-data``: the embedded models and demo data."""

from __future__ import annotations

import argparse
import json
from typing import Any

from flows.cli.subcommand import add_subcommand

TINY_MODELS = ("tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-shapes")


def cmd_tiny_model(args: argparse.Namespace) -> int:
    if args.name == "tiny-shapes":  # trained, shipped as weights: written out, not built
        from engine.model.embedded.shapes_model import build_shapes_model

        print(build_shapes_model(args.dir))
        return 0
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
                       "write a tiny model in diffusers layout: a random-weight one, or "
                       "the trained tiny-shapes",
                       example="loraflow tiny-model tiny-sd1 models/tiny-sd1")
    p.add_argument("name", choices=list(TINY_MODELS))
    p.add_argument("dir", help="output folder")

    p = add_subcommand(subparsers, "demo-data", cmd_demo_data,
                       "build the demo dataset (imagefolder, parquet, zip)",
                       example="loraflow demo-data data/demo")
    p.add_argument("dir", help="output folder")
