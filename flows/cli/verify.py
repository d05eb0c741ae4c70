"""``loraflow verify``: replay part of a segment and compare with its digest trail.

Never imports Prefect: a network's verifier node runs it beside ``loraflow segment``.
The verdict goes to stdout (``PASS`` or ``FAIL: step N: ...`` and a line of what was
replayed); the exit code is 0 for a pass, 6 for a mismatch, 2 for a checkpoint or
trail that cannot be read or verified.
"""

from __future__ import annotations

import argparse
from typing import Any

from flows.cli.subcommand import add_subcommand


def cmd_verify(args: argparse.Namespace) -> int:
    from engine.data.prepared import default_cache_root
    from engine.errors import ExitCode
    from engine.train.verify import verify_segment
    from flows.cli.train import load_task

    task = load_task(args.task, args.overrides)
    verdict = verify_segment(
        task, args.checkpoint_in, args.checkpoint_out, sample=args.sample, seed=args.seed,
        data_root=args.data_dir,
        cache_root=None if args.no_cache else (args.cache_dir or default_cache_root()),
    )
    for line in verdict.lines():
        print(line)
    return ExitCode.OK if verdict.passed else ExitCode.NOT_VERIFIED


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def add_commands(subparsers: Any) -> None:
    """Register ``verify``."""
    from engine.train.verify import DEFAULT_SAMPLE

    p = add_subcommand(
        subparsers, "verify", cmd_verify,
        "replay a random part of a segment and check it against the digest trail in its "
        "checkpoint (same device type and thread count as the worker)",
        example="loraflow verify --task task.json --checkpoint-in seg0/checkpoint "
                "--checkpoint-out seg1/checkpoint --sample 0.25")
    p.add_argument("--task", required=True, help="the task JSON file the segment trained")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE",
                   help="overrides the segment ran under, as for 'segment'")
    p.add_argument("--checkpoint-in", help="the segment's input checkpoint (none: the first "
                                           "segment, from the task's initial weights)")
    p.add_argument("--checkpoint-out", required=True, help="the checkpoint the segment wrote")
    p.add_argument("--sample", type=_fraction, default=DEFAULT_SAMPLE,
                   help="the most of the segment's steps to replay (default %(default)s); "
                        "the last window is always replayed")
    p.add_argument("--seed", type=int,
                   help="the sampling seed (default: a fresh random one, printed)")
    p.add_argument("--data-dir", help="where prepared datasets are kept")
    p.add_argument("--cache-dir", help="where latent/caption caches are kept")
    p.add_argument("--no-cache", action="store_true", help="encode every step (same result)")
