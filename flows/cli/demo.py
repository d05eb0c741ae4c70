"""``loraflow demo``: serve a web page to try a LoRA, base model and LoRA side by side.

A thin shell over :mod:`engine.infer.demo`; imports no Prefect. The LoRA file is checked
before the server starts (a pickle or a missing file is refused with exit code 2, as in
``generate``); the model loads when the page is first opened. The process becomes the
streamlit server (``exec``), so Ctrl-C and SIGTERM stop the server itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from flows.cli.subcommand import add_subcommand


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.infer.demo import streamlit_command
    from engine.infer.generate import read_lora_bytes

    read_lora_bytes(args.lora)  # refuse a pickle or a missing file before serving
    command = streamlit_command(
        args.model, args.lora, host=args.host, port=args.port, steps=args.steps,
        revision=args.revision, variant=args.variant, device=args.device,
    )
    print(f"serving the demo page on http://{args.host}:{args.port} (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached: the process is now the server


def add_commands(subparsers: Any) -> None:
    """Register ``demo``."""
    p = add_subcommand(subparsers, "demo", cmd_demo,
                       "serve a web page to try a LoRA beside its base model "
                       "(needs: pip install -e \".[demo]\")",
                       example="loraflow demo --model loraflow/tiny-sd1 --lora "
                               "runs/quickstart/lora/pytorch_lora_weights.safetensors")
    p.add_argument(
        "--model", required=True, help="base model: Hub id, local folder or loraflow/tiny-*"
    )
    p.add_argument("--lora", required=True, help="LoRA .safetensors file (diffusers or kohya)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--steps", type=int, default=25, help="the page's initial steps (default 25)")
    p.add_argument("--revision", default="main", help="model revision (default main)")
    p.add_argument("--variant", help="model weight variant, e.g. fp16")
    p.add_argument("--device", help="torch device (default: CUDA if present, else CPU)")
