"""``loraflow bench``: speed, memory, FLOPs and segment restart cost of the engine.

A thin shell over :mod:`engine.bench`. It never imports Prefect, so it runs on a bare
training node. Examples::

    loraflow bench --smoke                                    # seconds, tiny-sd1 at 64 px
    loraflow bench --family tiny-sd1 --json bench.json --markdown bench.md
    loraflow bench --family sd15 --resolution 512 --precision bf16 --batch-sizes 1,8,32
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flows.cli.subcommand import add_subcommand

# Kept here, not imported from engine.bench, so that building the CLI parser (for every
# command) does not import torch and diffusers; tests check they match engine.bench.
FAMILY_CHOICES = ("sd1", "sd15", "sd2", "sd21", "sdxl", "tiny-sd1", "tiny-sd2", "tiny-sdxl")
LEVER_CHOICES = ("gradient_checkpointing", "channels_last")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _lever_list(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    levers = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(levers) - set(LEVER_CHOICES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown lever(s) {unknown}; available: {list(LEVER_CHOICES)}"
        )
    return levers


def cmd_fixed_cost(args: argparse.Namespace) -> int:
    """Only the fixed cost of cold ``loraflow segment`` processes, phase by phase."""
    import json

    from engine.bench.fixed_cost import measure_fixed_cost, render_fixed_cost

    result = measure_fixed_cost(repeats=args.repeats or 3, threads=args.threads or 1)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    text = render_fixed_cost(result)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(text)
    sys.stdout.write(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.fixed_cost:
        return cmd_fixed_cost(args)
    from engine import bench
    from engine.logs import silence_progress_bars

    silence_progress_bars()
    settings = bench.make_settings(
        family=args.family, resolution=args.resolution, batch_sizes=args.batch_sizes,
        precision=args.precision, repeats=args.repeats, steps=args.steps, warmup=args.warmup,
        levers=args.levers, rank=args.rank, device=args.device, threads=args.threads,
        smoke=args.smoke, live=not args.no_live, restart=not args.no_restart,
        data_path=args.data_path,
    )
    report = bench.run_benchmark(settings)
    report.command = "loraflow " + " ".join(sys.argv[1:]) if sys.argv[1:] else "loraflow bench"
    sys.stdout.write(bench.write_outputs(report, args.json, args.markdown))
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``bench`` on the CLI's subparsers object."""
    p = add_subcommand(subparsers, "bench", cmd_bench,
                       "measure training speed, memory, FLOPs and segment restart cost",
                       example="loraflow bench --family tiny-sd1 --json bench.json")
    p.add_argument("--family", choices=list(FAMILY_CHOICES),
                   help="model: full-size architecture (random weights) or tiny (default tiny-sd1)")
    p.add_argument("--resolution", type=int, help="pixels (default: the family's native size)")
    p.add_argument("--batch-sizes", type=_int_list,
                   help="comma-separated micro-batch sizes (default 1,8,32; smoke 1,2)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"],
                   help="frozen-weight precision (default bf16 on a GPU, no on a CPU)")
    p.add_argument("--repeats", type=int,
                   help="runs per measurement; medians are reported (default 3)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default 3)")
    p.add_argument("--levers", type=_lever_list,
                   help="levers measured on vs off: gradient_checkpointing,channels_last (default "
                        "both) or none")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--device", help="torch device (default: CUDA if present, else CPU)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-live", action="store_true", help="skip encoding-every-step runs")
    p.add_argument("--no-restart", action="store_true",
                   help="skip the restart measurement (it saves the model to a temp folder)")
    p.add_argument("--data-path", type=_int_list, metavar="PX[,PX]",
                   help="also measure the data path (decode + transforms, cache and live, "
                        "0 and 2 workers) beside the step at these resolutions")
    p.add_argument("--fixed-cost", action="store_true",
                   help="instead: the fixed cost of cold `loraflow segment` processes (tiny-sd1, "
                        "the demo shapes, cache on and off), phase by phase: imports, checks, "
                        "dataset, model, adapter, cache, save, metrics, exit")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--markdown", help="write the markdown table here")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run: 1 repeat, 2 steps, batch sizes 1,2 (CI)")
