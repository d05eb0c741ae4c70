"""One time-boxed training segment as a Prefect task.

A segment resumes from its input checkpoint, trains until its steps are done, the whole
training is done or its budget is about to run out, and commits a checkpoint under
``<output_dir>/segments/<NNNN>/checkpoint``. Everything needed to resume travels as an
address, so a retry (or the next segment) may run on any worker that sees the storage.

Why a retry is exact: a failed attempt never commits, and the retry starts again from
the same *input* checkpoint, so the steps of the failed attempt are neither kept nor
counted twice; a retry after the commit finds the committed result (the engine's
idempotence) and trains nothing.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone

from prefect import task
from prefect.runtime import flow_run, task_run

from engine.store import storage
from engine.task.definition import TaskDefinition
from engine.train.segment import SegmentOptions, run_segment
from tasks import RUN_SCOPED
from tasks.cache import cache_root
from tasks.logging_bridge import engine_logs_to_prefect

#: Test-only fault injection: ``<segment index>:<global step>`` makes that segment raise
#: right after the given optimizer step, on its first attempt only.
FAULT_ENV = "LORAFLOW_FAULT_FAIL_SEGMENT_ONCE"
FAULT_MARKER = ".fault-injected"
#: Written after the segment: its summary, for a caller that ran it elsewhere.
RESULT_FILE = "result.json"
#: Written when an attempt starts: which run, attempt and machine work on the segment.
STARTED_FILE = "started.json"


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook; a retry of the segment does not raise again."""


def segment_dir(output_dir: str, index: int) -> str:
    """``<output_dir>/segments/<NNNN>``: one folder per segment, sortable by name."""
    return storage.join(output_dir, "segments", f"{index:04d}")


def backstop_timeout(budget_seconds: float | None) -> float | None:
    """Prefect's timeout for a segment: generous, because the segment times itself.

    The segment stops *within* its budget with a committed checkpoint; Prefect's
    timeout only catches a hang (a dead storage mount, a stuck collective), so it
    allows start-up and a slow save on top: ``budget * 1.5 + 120`` seconds.
    """
    return None if budget_seconds is None else budget_seconds * 1.5 + 120


def fault_hook(index: int, out_dir: str) -> Callable[[int], None] | None:
    """The ``after_step`` callback for :data:`FAULT_ENV`, or None when it does not apply.

    The first attempt writes a marker file in the segment's folder before raising, so
    the retry (same folder, maybe another process) sees it and runs clean.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    target, _, after = spec.partition(":")
    if int(target) != index:
        return None
    marker = storage.join(out_dir, FAULT_MARKER)
    if storage.exists(marker):
        return None
    fail_after = int(after or 1)

    def after_step(global_step: int) -> None:
        if global_step >= fail_after:
            storage.write_bytes(marker, f"failed after step {global_step}\n".encode())
            raise InjectedFault(
                f"{FAULT_ENV}: segment {index} fails after step {global_step} (first attempt)"
            )

    return after_step


def record_attempt(out_dir: str) -> None:
    """Write ``started.json``: for an operator asking "who is training this segment?"."""
    record = {
        "flow_run_id": flow_run.id,
        "task_run_id": task_run.id,
        "attempt": task_run.run_count,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_bytes(storage.join(out_dir, STARTED_FILE), json.dumps(record).encode())


def metrics_summary(metrics_url: str | None) -> dict:
    """Mean loss and throughput of one segment, from its ``metrics.jsonl``."""
    if not metrics_url:
        return {"loss": None, "samples_per_second": None, "train_seconds": 0.0}
    records = [json.loads(line) for line in storage.read_bytes(metrics_url).splitlines() if line]
    if not records:
        return {"loss": None, "samples_per_second": None, "train_seconds": 0.0}
    seconds = sum(r["seconds"] for r in records)
    samples = sum(r["samples"] for r in records)
    loss = sum(r["loss"] for r in records) / len(records)
    return {
        "loss": loss if math.isfinite(loss) else None,
        "samples_per_second": samples / seconds if seconds > 0 else None,
        "train_seconds": round(seconds, 3),
    }


@task(name="train-segment", retries=2, retry_delay_seconds=5, cache_policy=RUN_SCOPED)
def train_segment(
    task: TaskDefinition,
    index: int,
    output_dir: str,
    checkpoint: str | None,
    dataset: dict,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    budget_seconds: float | None = None,
) -> dict:
    """Run segment ``index`` from ``checkpoint``; return its result and metrics summary.

    Runs without in-segment validation images: the flow renders them once, at the final
    checkpoint, from the LoRA *file* (what a user loads); per-segment images would cost
    every segment time that belongs to training. ``dataset`` (the manifest) is an input
    so that the cache key, and the graph in the UI, follow the data.
    """
    out_dir = segment_dir(output_dir, index)
    options = SegmentOptions(
        checkpoint=checkpoint,
        budget_seconds=budget_seconds,
        data_root=data_dir,
        cache_root=cache_root(cache_dir),
        validate=False,
        after_step=fault_hook(index, out_dir),
    )
    record_attempt(out_dir)
    with engine_logs_to_prefect():
        result = run_segment(task, out_dir, options)
    summary = {
        "index": index,
        "output_dir": out_dir,
        "dataset_hash": dataset["content_hash"],
        **asdict(result),
        **metrics_summary(result.metrics),
    }
    storage.write_bytes(storage.join(out_dir, RESULT_FILE), json.dumps(summary).encode())
    return summary


def read_result(output_dir: str, index: int) -> dict:
    """The summary segment ``index`` wrote, wherever it ran (the fsspec handoff)."""
    return json.loads(storage.read_bytes(storage.join(segment_dir(output_dir, index), RESULT_FILE)))


class SegmentRunFailed(RuntimeError):
    """A segment dispatched to a deployment ended without completing."""


@task(name="dispatch-segment", retries=2, retry_delay_seconds=10, cache_policy=RUN_SCOPED)
def dispatch_segment(
    deployment: str,
    task: TaskDefinition,
    index: int,
    output_dir: str,
    checkpoint: str | None,
    dataset: dict,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    budget_seconds: float | None = None,
    name: str | None = None,
) -> dict:
    """Run segment ``index`` as a flow run of ``deployment``: on whichever worker is free.

    Only addresses go to the worker and come back (the summary is read from the
    segment's ``result.json``), so the worker needs the same storage, nothing else. If
    the worker crashes, this task's retry dispatches the segment again, to any worker;
    it resumes from the same input checkpoint.
    """
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment,
        parameters={
            "task": task.model_dump(mode="json"),
            "index": index,
            "output_dir": output_dir,
            "checkpoint": checkpoint,
            "dataset": dataset,
            "data_dir": data_dir,
            "cache_dir": cache_dir,
            "budget_seconds": budget_seconds,
            "name": name or f"segment-{index}",
        },
        timeout=None,  # waits for a free worker as long as it takes; the segment times itself
        poll_interval=3,
    )
    state = run.state
    if state is None or not state.is_completed():
        status = state.name if state else "without a state"
        message = f": {state.message}" if state and state.message else ""
        raise SegmentRunFailed(f"segment {index} (flow run {run.name}) ended {status}{message}")
    return read_result(output_dir, index)
