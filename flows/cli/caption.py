"""``loraflow caption``: prepare a task's dataset(s) and caption them, nothing else.

For reviewing captions before training: the summary says what was made, found in the
cache, kept or left uncaptioned (and why); each captioned dataset has its editable
``metadata.jsonl``, and ``--output DIR`` copies images and captions into DIR as an image
folder to edit and name as the task's ``dataset.name``. It captions through the call the
flow's caption step and ``loraflow segment`` make (``caption_manifests`` in
:mod:`engine.data.prepared`), so with the same ``--data-dir`` all three share one caption
cache (``captions/`` in it): a later ``loraflow run`` asks the backend for nothing this
command had answered, and the reverse. Never imports Prefect.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flows.cli.subcommand import add_subcommand
from flows.cli.train import add_overrides, add_quiet, load_task


def cmd_caption(args: argparse.Namespace) -> int:
    from engine.caption.backend import CaptionError
    from engine.caption.metadata import export_imagefolder
    from engine.data.prepared import caption_manifests, prepare_subsets

    task = load_task(args.task, args.overrides)
    if task.captioning is None:
        raise CaptionError(f"{args.task}: the task has no 'captioning' section; add one "
                           '(e.g. {"backend": "transformers", "model": '
                           '"Salesforce/blip-image-captioning-base"}) to caption its images')
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    say("preparing the dataset")
    manifests = prepare_subsets(task, args.data_dir, progress=not args.quiet)
    say(f"captioning with {task.captioning.backend} model {task.captioning.model}")
    _, summary = caption_manifests(
        task, manifests, args.data_dir,
        progress=lambda done, total: say(f"  captioned {done}/{total}"),
    )
    for line in summary.lines():
        say(line)
    result: dict[str, Any] = summary.to_dict()
    if args.output:
        if len(summary.reports) == 1:
            [report] = summary.reports.values()
            result["output"] = export_imagefolder(report.manifest.address, args.output)
        else:
            result["output"] = {
                str(i): export_imagefolder(r.manifest.address, f"{args.output}/subset-{i}")
                for i, r in summary.reports.items()
            }
        say(f"editable copy: {result['output']}")
    print(json.dumps(result, indent=2))
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``caption``."""
    p = add_subcommand(subparsers, "caption", cmd_caption,
                       "prepare the task's dataset and caption its images (captioning "
                       "section); print the summary",
                       example="loraflow caption task.json --output data/captioned")
    p.add_argument("task", help="task JSON file with a 'captioning' section")
    add_overrides(p)
    add_quiet(p)
    p.add_argument("--output", help="also copy images and metadata.jsonl into this folder "
                                    "(an image folder to review, edit and train from)")
    p.add_argument("--data-dir",
                   help="where prepared datasets and the caption cache (captions/ in it) "
                        "are kept, as for run and segment (default: $LORAFLOW_HOME/datasets)")
