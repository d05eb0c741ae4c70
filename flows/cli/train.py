"""``loraflow validate | schema | segment | run | retry``: check a task, train it.

``validate``, ``schema`` and ``segment`` never import Prefect: a Crynux-style node runs
one segment with ``loraflow segment`` in a process without it. ``run`` and ``retry`` run
the ``finetune`` flow here (:mod:`flows.run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from flows.cli import launch
from flows.cli.subcommand import add_subcommand

#: When this process began (the module is imported as the CLI starts): a segment's time
#: budget counts the start-up too.
STARTED_AT = time.monotonic()


def load_task(path: str, overrides: list[str] | None = None) -> Any:
    """The task definition at ``path`` with ``key.path=value`` overrides, validated (bad
    input, in the file or an override, raises: exit code 2)."""
    from engine.task.overrides import load_task_with_overrides

    return load_task_with_overrides(path, overrides or [])


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The ``KEY.PATH=VALUE ...`` arguments after the task file."""
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY.PATH=VALUE",
        help="change a field of the task file, checked like the file; the value is JSON, "
             "else a string (e.g. train_args.learning_rate=5e-5 lora.rank=16)",
    )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar (also: LORAFLOW_QUIET=1)")


# -- validate, schema -----------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser, *, output: str,
                           budget: str) -> None:
    """What ``segment`` and ``run`` both take: the task, overrides, where things go, budget."""
    parser.add_argument("task", help="task JSON file")
    add_overrides(parser)
    add_quiet(parser)
    parser.add_argument("--output-dir", required=True, help=output)
    parser.add_argument("--budget-seconds", type=float, help=budget)
    parser.add_argument("--data-dir",
                        help="where prepared datasets are kept (default: $LORAFLOW_HOME/datasets)")
    parser.add_argument("--cache-dir",
                        help="where latent/caption caches are kept (default: "
                             "$LORAFLOW_HOME/cache; share one on S3 between workers)")


def cmd_validate(args: argparse.Namespace) -> int:
    task = load_task(args.task, args.overrides)
    if args.check_refs:
        check_references(task, args.task)
    print(task.model_dump_json(indent=2))
    return 0


def check_references(task: Any, where: str, prepared_in: str | None = None) -> None:
    """The dataset and model the task names can be had (engine.task.references); else exit 2."""
    from engine.store.storage import redact
    from engine.task.references import check_references as check

    check(task, prepared_in=prepared_in, source=redact(where))


def cmd_schema(args: argparse.Namespace) -> int:
    from engine.task.schema import render_schema

    sys.stdout.write(render_schema())
    return 0


# -- segment --------------------------------------------------------------------------


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
    from engine.train.phases import phase

    with phase("imports: the engine"):
        from engine.data.prepared import default_cache_root, default_data_root
        from engine.errors import ExitCode
        from engine.train.options import SegmentOptions, StopReason
        from engine.train.progress import StepBar, console_progress_wanted
        from engine.train.segment import run_segment

    with phase("task validation"):
        task = load_task(args.task, args.overrides)
    with phase("reference checks"):
        check_references(task, args.task, prepared_in=args.data_dir or default_data_root())
    if launch.launch_wanted(args):  # --nproc-per-node N: N ranks run this command
        return launch.launch_segment(args, STARTED_AT, task)
    from engine.train.distributed import current_world, leave_world, world_from_env
    if not args.verbose:
        from engine.logs import silence_progress_bars

        with phase("imports: libraries (their progress bars off)"):
            silence_progress_bars()
    stop = StopRequest()
    stop.install()
    shown = console_progress_wanted() and not args.quiet and world_from_env().writes
    bar = StepBar() if shown else None  # several processes: rank 0's only
    opts = SegmentOptions(
        checkpoint=args.checkpoint,
        budget_seconds=args.budget_seconds,
        data_root=args.data_dir,
        cache_root=None if args.no_cache else (args.cache_dir or default_cache_root()),
        progress=False,  # the step bar is ``bar``, with loss, lr and samples/s
        validate=not args.no_validation,
        should_stop=stop,
        started_at=launch.started_at(STARTED_AT),
        on_step=bar,
    )
    try:
        result = run_segment(task, args.output_dir, opts)
        writes = current_world().writes  # several processes: only rank 0 prints
    finally:
        if bar is not None:
            bar.close()
        leave_world()
    if not writes:
        return ExitCode.INTERRUPTED if result.stopped_by == StopReason.SIGNAL else ExitCode.OK
    if not args.quiet:  # for the person at the terminal; stdout stays one JSON record
        for line in epoch_lines(result.data):
            print(line, file=sys.stderr)
    print(segment_summary(result, args.overrides))
    return ExitCode.INTERRUPTED if result.stopped_by == StopReason.SIGNAL else ExitCode.OK


def segment_summary(result: Any, overrides: list[str]) -> str:
    """The segment's result as JSON, with the overrides it ran under (if any)."""
    from engine.store.storage import redact

    record = json.loads(result.to_json())
    if overrides:
        record["overrides"] = [redact(text) for text in overrides]
    return json.dumps(record, sort_keys=True)


# -- run, retry -----------------------------------------------------------------------


def describe(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: where the LoRA is and how training went."""
    from engine.store.storage import redact

    if summary.get("training_type") == "full":  # a whole model, no LoRA files
        model = summary["model"]
        lines = [f"Full fine-tune published to {redact(model['model_dir'])}"]
        for label, key in (("diffusers", "diffusers_model"), ("file", "single_file"),
                           ("readme", "readme")):
            lines.append(f"  {label:<10} {redact(model[key])}")
    else:
        lora = summary["lora"]
        lines = [f"LoRA published to {redact(lora['lora_dir'])}"]
        for label in ("diffusers", "kohya", "readme"):
            if lora.get(label):
                lines.append(f"  {label:<10} {redact(lora[label])}")
        lines += [f"  {'embedding':<10} {redact(url)} ({key.split(':', 1)[1]})"
                  for key, url in (lora.get("variants") or {}).items()
                  if key.startswith("embedding:")]
    for image in summary.get("validation", []):
        lines.append(f"  {'image':<10} {redact(image)}")
    if summary.get("overrides"):
        lines.append(f"  {'overrides':<10} {redact(' '.join(summary['overrides']))}")
    lines += epoch_lines((summary.get("dataset") or {}).get("epoch"))
    lines += made_data_lines(summary.get("dataset") or {})
    lines.append(
        f"trained {summary['global_step']} steps in {summary['segments']} segment(s); "
        f"final checkpoint {redact(summary['checkpoint'])}"
    )
    return "\n".join(lines)


def epoch_lines(epoch: dict[str, Any] | None) -> list[str]:
    """What one epoch trained (buckets, subsets, skipped files), if the summary says."""
    if not epoch:
        return []
    from pydantic import TypeAdapter

    from engine.data.epoch_summary import EpochSummary, summary_lines

    return summary_lines(TypeAdapter(EpochSummary).validate_python(epoch))


def made_data_lines(dataset: dict[str, Any]) -> list[str]:
    """What the caption and class-images steps did: a re-run shows 0 captioned and 0
    generated, the proof that nothing was made twice."""
    lines = []
    if captions := dataset.get("captions"):
        lines.append(f"captions: {captions['captioned']} captioned now, "
                     f"{captions['from_cache']} from the cache, {captions['kept']} kept, "
                     f"{len(captions['uncaptioned'])} uncaptioned")
    if made := dataset.get("class_images"):
        lines.append(f"class images: {made['count']} ({made['generated']} generated now, "
                     f"{made['reused']} reused, {made['from_folder']} from class_data_dir)")
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline here; bad input is refused before Prefect starts."""
    from engine.train.progress import QUIET_ENV
    from flows.run import outcome, run_here

    task = load_task(args.task, args.overrides)
    if args.quiet:
        os.environ[QUIET_ENV] = "1"  # read where the segment task runs (this process)
    state = run_here(task, args.output_dir, cache_dir=args.cache_dir, data_dir=args.data_dir,
                     budget_seconds=args.budget_seconds, overrides=args.overrides,
                     processes_per_segment=args.processes_per_segment)
    print(describe(outcome(state)))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Resume a failed or crashed run as the same flow run; print its summary."""
    from flows.run import outcome, retry_flow_run, start_prefect

    start_prefect()
    print(describe(outcome(retry_flow_run(args.flow_run, force=args.force))))
    return 0


# -- the parser -----------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    """Register ``validate``, ``schema``, ``segment``, ``run`` and ``retry``."""
    p = add_subcommand(subparsers, "validate", cmd_validate,
                       "check a task definition; print it normalized (with any overrides)",
                       example="loraflow validate examples/quickstart.json lora.rank=8")
    p.add_argument("task", help="task JSON file (path or fsspec URL)")
    add_overrides(p)
    p.add_argument("--check-refs", action="store_true",
                   help="also check what the task names, without loading it: the dataset "
                        "exists and has the columns, the model folder has model_index.json, "
                        "a Hub model is cached or reachable (segment always checks)")

    add_subcommand(subparsers, "schema", cmd_schema, "print the task definition's JSON Schema",
                   example="loraflow schema > finetune-task.schema.json")

    p = add_subcommand(subparsers, "segment", cmd_segment,
                       "run one training segment (as a Crynux node does)",
                       example="loraflow segment examples/quickstart.json --output-dir out/1 "
                               "--checkpoint out/0/checkpoint")
    add_training_arguments(p, output="where checkpoint/ and validation/ go (path or URL)",
                           budget="wall-clock budget of this segment")
    p.set_defaults(exit_at_once=True)  # nothing is left to do once it returns
    p.add_argument("--checkpoint", help="previous segment's checkpoint (overrides the task's)")
    p.add_argument("--no-cache", action="store_true",
                   help="encode images and captions every step")
    p.add_argument("--no-validation", action="store_true", help="skip validation images")
    launch.add_launch_arguments(p)

    p = add_subcommand(subparsers, "run", cmd_run,
                       "run a whole fine-tuning: segments until FINISH, then publish",
                       example="loraflow run examples/quickstart.json "
                               "train_args.learning_rate=5e-5 --output-dir runs/quickstart")
    add_training_arguments(p, output="run output location (path or URL, e.g. s3://bucket/runs/x)",
                           budget="wall-clock budget of each segment")
    p.add_argument("--processes-per-segment", type=launch.positive_int, metavar="N",
                   help="train each segment with N processes (one per GPU; gloo on CPU), "
                        "as `loraflow segment --nproc-per-node N` does (docs/distributed.md)")

    p = add_subcommand(subparsers, "retry", cmd_retry,
                       "retry a failed or crashed finetune flow run; completed steps are not "
                       "redone", example="loraflow retry quickstart-2026-12-01-2315")
    p.add_argument("flow_run", help="flow run id or name")
    p.add_argument("--force", action="store_true",
                   help="also retry a run still marked Running (its process was killed)")
