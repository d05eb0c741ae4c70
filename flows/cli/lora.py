"""``loraflow generate`` and ``loraflow inspect``: use and look into a trained LoRA.

Thin shells over :mod:`engine.infer.generate`; neither imports Prefect. Errors a user
can fix are :class:`engine.errors.LoraflowError` (a pickle LoRA, a LoRA for another
family) and :func:`flows.cli.main.main` prints them without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flows.cli.subcommand import add_subcommand


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.infer.generate import generate_images, write_images

    images = generate_images(
        args.model,
        args.lora,
        args.prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        lora_scale=args.lora_scale,
        num_images=args.num_images,
        negative_prompt=args.negative_prompt,
        revision=args.revision,
        variant=args.variant,
        device=args.device,
        embeddings=args.embedding,
    )
    for url in write_images(images, args.output_dir, stem=f"seed{args.seed}"):
        print(url)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from engine.infer.generate import format_report, inspect_lora

    report = inspect_lora(args.file)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_report(report) + "\n")
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``generate`` and ``inspect`` on the CLI's subparsers object."""
    p = add_subcommand(subparsers, "generate", cmd_generate,
                       "render images with a base model and a LoRA (diffusers, kohya or "
                       "LyCORIS LoHa/LoKr/DoRA file; bundled embeddings load with it)",
                       example="loraflow generate --model loraflow/tiny-shapes --lora "
                               "runs/quickstart/lora/pytorch_lora_weights.safetensors "
                               "--prompt 'a sks circle on a white background' --guidance 2 "
                               "--output-dir images")
    p.add_argument(
        "--model", required=True, help="base model: Hub id, local folder or loraflow/tiny-*"
    )
    p.add_argument("--lora", help="LoRA .safetensors file (path or URL); omit for the base model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5)")
    p.add_argument("--width", type=int, help="pixels (default: the model's)")
    p.add_argument("--height", type=int, help="pixels (default: the model's)")
    p.add_argument("--embedding", action="append", metavar="FILE",
                   help="textual-inversion .safetensors file, called in the prompt by its "
                        "token (its loraflow_token, else its file name); repeatable")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--revision", default="main", help="model revision (default main)")
    p.add_argument("--variant", help="model weight variant, e.g. fp16")
    p.add_argument("--device", help="torch device (default: CUDA if present, else CPU)")
    p.add_argument("--output-dir", default=".", help="where PNGs go (path or URL; default .)")

    p = add_subcommand(
        subparsers, "inspect", cmd_inspect,
        "show what a LoRA file holds: format, algorithm, family, rank or factor, alpha, "
        "targets, bundled embeddings, metadata",
        example="loraflow inspect runs/quickstart/lora/pytorch_lora_weights.safetensors",
    )
    p.add_argument("file", help="LoRA .safetensors file (path or URL)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
