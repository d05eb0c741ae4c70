"""One time-boxed training segment as a Prefect task.

A segment resumes from its input checkpoint, trains until its steps are done, the whole
training is done or its budget is about to run out, and commits a checkpoint under
``<output_dir>/segments/<NNNN>/checkpoint``. Everything needed to resume travels as an
address (:class:`~tasks.payloads.SegmentRequest`), so a retry (or the next segment) may
run on any worker that sees the storage.

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
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run, task_run

from engine.store import storage
from engine.train.options import SegmentOptions
from engine.train.progress import StepBar, all_of, console_progress_wanted
from engine.train.segment import run_segment
from tasks import step
from tasks.cache import cache_root
from tasks.logging_bridge import engine_logs_to_prefect
from tasks.payloads import SegmentRequest, SegmentSummary
from tasks.progress import ArtifactProgress
from tasks.segment_processes import train_in_processes

#: Written after the segment: its summary, for a caller that ran it elsewhere.
RESULT_FILE = "result.json"
#: Written when an attempt starts: which run, attempt and machine work on the segment.
STARTED_FILE = "started.json"


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


def metrics_summary(metrics_url: str | None) -> dict[str, Any]:
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


@step("train-segment", not_in_cache_key=("progress_artifact",))
def train_segment(request: SegmentRequest, progress_artifact: str | None = None) -> SegmentSummary:
    """Run segment ``request.index`` from ``request.checkpoint``; return its summary.

    Runs without in-segment validation images: the flow renders them once, at the final
    checkpoint, from the LoRA *file* (what a user loads); per-segment images would cost
    every segment time that belongs to training.

    Progress as it trains: a bar on this process's console (unless ``LORAFLOW_QUIET``) and,
    given the run's ``progress_artifact`` id, that artifact every few seconds. The id is
    not part of the cache key: a retried flow run makes a new artifact and must still
    find the segments it completed.

    With ``request.processes_per_segment`` N the segment is trained by N processes in a
    child process group (tasks/segment_processes.py); their log lines, not the bar or the
    artifact, show its progress.
    """
    out_dir = segment_dir(request.output_dir, request.index)
    processes = request.processes_per_segment  # None: this process trains it
    bar = StepBar() if console_progress_wanted() and not processes else None
    artifact = ArtifactProgress(progress_artifact) if progress_artifact else None
    options = SegmentOptions(
        checkpoint=request.checkpoint,
        budget_seconds=request.budget_seconds,
        data_root=request.data_dir,
        cache_root=cache_root(request.cache_dir),
        validate=False,
        on_step=all_of(bar, artifact),
    )
    record_attempt(out_dir)
    try:
        with engine_logs_to_prefect():
            if processes:  # N processes: ``loraflow segment --nproc-per-node N`` as a child
                result = train_in_processes(
                    request.task.model_dump_json(), out_dir, processes, get_run_logger(),
                    checkpoint=request.checkpoint, budget_seconds=request.budget_seconds,
                    data_dir=request.data_dir, cache_root=options.cache_root)
            else:
                result = run_segment(request.task, out_dir, options)
    finally:
        if bar is not None:
            bar.close()
    if artifact is not None:
        artifact.flush()
    summary = SegmentSummary(
        index=request.index,
        output_dir=out_dir,
        dataset_hash=request.dataset.content_hash,
        result=result,
        **metrics_summary(result.metrics),
        world_size=processes or 1,
    )
    record = json.dumps(summary.model_dump(mode="json")).encode()
    storage.write_bytes(storage.join(out_dir, RESULT_FILE), record)
    return summary


def read_result(output_dir: str, index: int) -> SegmentSummary:
    """The summary segment ``index`` wrote, wherever it ran (the fsspec handoff)."""
    url = storage.join(segment_dir(output_dir, index), RESULT_FILE)
    return SegmentSummary.model_validate_json(storage.read_bytes(url))


class SegmentRunFailed(RuntimeError):
    """A segment dispatched to a deployment ended without completing."""


@step("dispatch-segment", retry_delay_seconds=10, not_in_cache_key=("progress_artifact",))
def dispatch_segment(deployment: str, request: SegmentRequest, name: str,
                     progress_artifact: str | None = None) -> SegmentSummary:
    """Run a segment as a flow run of ``deployment``: on whichever worker is free.

    Only addresses go to the worker and come back (the summary is read from the
    segment's ``result.json``), so the worker needs the same storage, nothing else. If
    the worker crashes, this task's retry dispatches the segment again, to any worker;
    it resumes from the same input checkpoint. The worker moves the run's
    ``progress_artifact`` itself, through the API, as it trains.
    """
    from prefect.deployments import run_deployment

    parameters = {"request": request.model_dump(mode="json"), "name": name}
    if progress_artifact:
        parameters["progress_artifact"] = progress_artifact
    run = run_deployment(
        deployment,
        parameters=parameters,
        timeout=None,  # waits for a free worker as long as it takes; the segment times itself
        poll_interval=3,
    )
    state = run.state
    if state is None or not state.is_completed():
        status = state.name if state else "without a state"
        message = f": {state.message}" if state and state.message else ""
        raise SegmentRunFailed(
            f"segment {request.index} (flow run {run.name}) ended {status}{message}"
        )
    return read_result(request.output_dir, request.index)
