"""The ``loraflow`` subcommands that need Prefect: ``serve``, ``serve-segments``, ``retry``.

Kept out of ``flows/cli.py`` so that the commands a Crynux-style node runs never import
Prefect; each handler imports it only when called.
"""

from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from flows.serve import serve_command

    return serve_command(args)


def _serve_segments(args: argparse.Namespace) -> int:
    from flows.serve import serve_segments_command

    return serve_segments_command(args)


def _retry(args: argparse.Namespace) -> int:
    from flows.run import retry_command

    return retry_command(args)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``serve-segments`` and ``retry`` to the ``loraflow`` parser."""
    help = "serve the finetune flow as a deployment (runs from the UI, API or a schedule)"
    p = subparsers.add_parser("serve", help=help, description=help)
    p.set_defaults(func=_serve)
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

    help = "serve the finetune-segment flow: this machine trains segments handed to it"
    p = subparsers.add_parser("serve-segments", help=help, description=help)
    p.set_defaults(func=_serve_segments)
    p.add_argument("--name", default="gpu", help="deployment name (default: gpu)")
    p.add_argument("--limit", type=int, default=1,
                   help="segments at a time on this machine (default 1: one GPU)")

    help = "retry a failed or crashed finetune flow run; completed steps are not redone"
    p = subparsers.add_parser("retry", help=help, description=help)
    p.set_defaults(func=_retry)
    p.add_argument("flow_run", help="flow run id or name")
    p.add_argument("--force", action="store_true",
                   help="also retry a run still marked Running (its process was killed)")
