"""The ``loraflow`` command line.

Each subcommand is a thin shell over an engine or flow function. Commands that a
Crynux-style node runs (``segment``, ``validate``) never import Prefect, so they work
in a process without it. Errors a user can fix are printed as one clear message and
mapped to exit codes (see :class:`engine.errors.ExitCode`); only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

STARTED_AT = time.monotonic()


def _task(path: str):
    from engine.task.validation import load_task

    return load_task(path)


# -- commands -------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    task = _task(args.task)
    print(task.model_dump_json(indent=2))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from engine.task.schema import render_schema

    sys.stdout.write(render_schema())
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from engine.model.embedded.tiny_models import build_tiny_model

    path = build_tiny_model(args.name, args.dir)
    print(path)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from engine.model.embedded.demo_data import build_demo_data

    paths = build_demo_data(args.dir)
    print(json.dumps({k: str(v) for k, v in vars(paths).items()}, indent=2))
    return 0


class StopRequest:
    """Set by SIGTERM/SIGINT: the segment commits at the next step boundary, then exits."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        logging.getLogger("loraflow").warning(
            "stop requested (signal %d): committing a checkpoint at the next step", signum
        )

    def __call__(self) -> bool:
        return self.requested


def cmd_segment(args: argparse.Namespace) -> int:
    from engine.data.prepared import default_cache_root
    from engine.errors import ExitCode
    from engine.train.segment import SegmentOptions, run_segment

    task = _task(args.task)
    if not args.verbose:
        from engine.logs import silence_progress_bars

        silence_progress_bars()
    stop = StopRequest()
    stop.install()
    opts = SegmentOptions(
        checkpoint=args.checkpoint,
        budget_seconds=args.budget_seconds,
        data_root=args.data_dir,
        cache_root=None if args.no_cache else (args.cache_dir or default_cache_root()),
        progress=sys.stderr.isatty(),
        validate=not args.no_validation,
        should_stop=stop,
        started_at=STARTED_AT,
    )
    result = run_segment(task, args.output_dir, opts)
    print(result.to_json())
    return ExitCode.INTERRUPTED if result.stopped_by == "signal" else ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    from flows.run import run_command

    return run_command(args)


# -- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraflow",
        description="Fine-tune Stable Diffusion LoRA adapters in time-boxed, resumable segments.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("validate", cmd_validate, "check a task definition; print it normalized")
    p.add_argument("task", help="task JSON file (path or fsspec URL)")

    add("schema", cmd_schema, "print the task definition's JSON Schema")

    p = add("tiny-model", cmd_tiny_model, "build a tiny random-weight model in diffusers layout")
    p.add_argument("name", choices=["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
    p.add_argument("dir", help="output folder")

    p = add("demo-data", cmd_demo_data, "build the demo dataset (imagefolder, parquet, zip)")
    p.add_argument("dir", help="output folder")

    p = add("segment", cmd_segment, "run one training segment (as a Crynux node does)")
    p.add_argument("task", help="task JSON file")
    p.add_argument("--output-dir", required=True, help="where checkpoint/ and validation/ go (path or URL)")
    p.add_argument("--checkpoint", help="previous segment's checkpoint (overrides the task's)")
    p.add_argument("--budget-seconds", type=float, help="wall-clock budget of this segment")
    p.add_argument("--data-dir", help="where prepared datasets are kept (default: $LORAFLOW_HOME/datasets)")
    p.add_argument("--cache-dir", help="where latent/caption caches are kept (default: $LORAFLOW_HOME/cache)")
    p.add_argument("--no-cache", action="store_true", help="encode images and captions every step")
    p.add_argument("--no-validation", action="store_true", help="skip validation images")

    p = add("run", cmd_run, "run a whole fine-tuning: segments until FINISH, then publish")
    p.add_argument("task", help="task JSON file")
    p.add_argument("--output-dir", required=True, help="run output location (path or URL, e.g. s3://bucket/runs/x)")
    p.add_argument("--cache-dir", help="shared cache location (default: $LORAFLOW_HOME/cache)")
    p.add_argument("--data-dir", help="prepared datasets location (default: $LORAFLOW_HOME/datasets)")
    p.add_argument("--budget-seconds", type=float, help="wall-clock budget of each segment")
    # Commands that live in their own modules (each registers its subparsers).
    from flows import commands_bench, commands_flow, commands_lora

    for module in (commands_flow, commands_lora, commands_bench):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.errors import LoraflowError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "botocore", "s3fs", "aiobotocore", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        from engine.logs import quiet_libraries

        quiet_libraries()
    try:
        return args.func(args)
    except LoraflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
