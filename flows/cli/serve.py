"""``loraflow serve`` and ``loraflow serve-segments``: serve the flows as deployments.

The processes themselves are :mod:`flows.serve`; this module turns the command line
into their parameters. Prefect is imported only when a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from flows.cli.subcommand import add_subcommand


def deployment_parameters(args: argparse.Namespace, task: Any) -> dict[str, Any]:
    """The ``finetune`` parameters a served deployment starts its runs with."""
    from flows.run import absolute_location

    parameters: dict[str, Any] = {
        "task": task.model_dump(mode="json"),
        "output_dir": absolute_location(args.output_dir),
    }
    optional = {
        "cache_dir": absolute_location(args.cache_dir),
        "data_dir": absolute_location(args.data_dir),
        "budget_seconds": args.budget_seconds,
        "segment_deployment": args.segment_deployment,
    }
    parameters.update({k: v for k, v in optional.items() if v is not None})
    return parameters


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve ``finetune/<name>`` with the task file as its default parameters."""
    from flows.cli.train import load_task
    from flows.serve import serve_finetune

    task = load_task(args.task)
    serve_finetune(
        args.name, deployment_parameters(args, task), cron=args.cron, interval=args.interval,
        description=f"Fine-tune a LoRA from {args.task}", limit=args.limit,
    )
    return 0


def cmd_serve_segments(args: argparse.Namespace) -> int:
    from flows.serve import serve_segments

    serve_segments(args.name, args.limit)
    return 0


def cmd_detect_crashes(args: argparse.Namespace) -> int:
    from flows.crash_detection import ensure_crash_detection

    automation_id = ensure_crash_detection(args.after_silence)
    print(f"automation {automation_id}: a finetune-segment run silent for "
          f"{args.after_silence} s is marked Crashed and its segment dispatched again")
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``serve``, ``serve-segments`` and ``detect-crashes``."""
    p = add_subcommand(
        subparsers, "serve", cmd_serve,
        "serve the finetune flow as a deployment (runs from the UI, API or a schedule)",
        example="loraflow serve examples/quickstart.json --output-dir 'runs/{flow_run_name}' "
                "--cron '0 3 * * *'",
    )
    p.add_argument("task", help="task JSON file: the deployment's default parameters")
    p.add_argument("--output-dir", required=True,
                   help="run output location; {date} and {flow_run_name} are filled per run")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", help='schedule, e.g. "0 3 * * *" (03:00 every day)')
    when.add_argument("--interval", type=float, help="schedule: seconds between runs")
    p.add_argument("--name", default="loraflow", help="deployment name (default: loraflow)")
    p.add_argument("--cache-dir", help="shared cache location")
    p.add_argument("--data-dir", help="prepared datasets location")
    p.add_argument("--budget-seconds", type=float, help="wall-clock budget of each segment")
    p.add_argument("--segment-deployment",
                   help="run segments on the workers serving this deployment, e.g. "
                        "finetune-segment/gpu (see serve-segments)")
    p.add_argument("--limit", type=int, default=1,
                   help="runs at a time in this process (default 1)")

    p = add_subcommand(
        subparsers, "serve-segments", cmd_serve_segments,
        "serve the finetune-segment flow: this machine trains segments handed to it",
        example="loraflow serve-segments --name gpu",
    )
    p.add_argument("--name", default="gpu", help="deployment name (default: gpu)")
    p.add_argument("--limit", type=int, default=1,
                   help="segments at a time on this machine (default 1: one GPU)")

    p = add_subcommand(
        subparsers, "detect-crashes", cmd_detect_crashes,
        "create the server automation that marks a dead worker's segment run Crashed, so the "
        "segment is dispatched to another worker",
        example="loraflow detect-crashes --after-silence 540",
    )
    p.add_argument("--after-silence", type=int, default=540, metavar="SECONDS",
                   help="seconds without a heartbeat (PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the "
                        "workers, 180 by default) before a run is called dead; default 540")
