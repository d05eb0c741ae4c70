"""The training loop: step until a stop, logging, checkpointing and reporting each step.

Read top to bottom, :func:`train` is all that happens between two optimizer steps. Its
state is explicit: the trainer (``tr.global_step`` and what it advances), the clock
(which only this loop and the saver feed), and the stream of micro-batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from engine.train.clock import SegmentClock
from engine.train.distributed import agreed_stop
from engine.train.metrics import MetricsLog
from engine.train.options import StepCallback, StepReport, StopReason
from engine.train.samples import SampleSource
from engine.train.saver import CheckpointSaver, estimated_checkpoint_bytes
from engine.train.stream import batch_stream
from engine.train.trainer import Trainer, train_step

log = logging.getLogger(__name__)


def stop_reason(tr: Trainer, end: int, clock: SegmentClock,
                should_stop: Callable[[], bool]) -> StopReason | None:
    """Why the segment must stop before the next step, or None to go on."""
    if tr.global_step >= end:
        return StopReason.FINISHED if end >= tr.plan.total_steps else StopReason.STEPS
    if should_stop():
        return StopReason.SIGNAL
    if not clock.fits_another_step(estimated_checkpoint_bytes(tr.params.values())):
        return StopReason.BUDGET
    return None


def train(tr: Trainer, source: SampleSource, end: int, *, clock: SegmentClock,
          saver: CheckpointSaver, metrics: MetricsLog, workers: int,
          should_stop: Callable[[], bool], on_step: StepCallback | None = None,
          progress: bool = False) -> StopReason:
    """Train from ``tr.global_step`` until a stop before ``end``; returns why it stopped."""
    start = tr.global_step
    batches = batch_stream(source, tr.plan, start, end, workers, tr.world)
    bar = progress_bar(progress and tr.world.writes, start, end)  # several ranks: rank 0's
    log.info("training steps %d-%d of %d", start, end, tr.plan.total_steps)
    try:
        while (stop := agreed_stop(tr.world, stop_reason(tr, end, clock, should_stop))) is None:
            t0 = time.monotonic()
            step = train_step(tr, batches)
            seconds = time.monotonic() - t0
            clock.record_step(seconds)
            samples_per_second = step["samples"] / seconds
            metrics.log({
                "global_step": tr.global_step,
                "epoch": tr.plan.epoch_of(tr.global_step - 1),
                **step,
                "seconds": seconds,
                "samples_per_second": samples_per_second,
            })
            bar.update(1)
            bar.set_postfix(loss=f"{step['loss']:.4f}")
            saver.record_step(tr, step["loss"], end)  # the digest trail (digests.py)
            checkpoint = saver.save_intermediate(tr) if saver.due(tr.global_step, end) else None
            if on_step is not None:
                on_step(StepReport(
                    global_step=tr.global_step, end_step=end, total_steps=tr.plan.total_steps,
                    loss=step["loss"], lr=step["lr"], samples_per_second=samples_per_second,
                    elapsed=clock.elapsed(), checkpoint=checkpoint,
                ))
        return stop
    finally:
        batches.close()  # stop data-loader workers now, not at garbage collection
        bar.close()


def progress_bar(enabled: bool, start: int, end: int) -> Any:
    """A tqdm bar over this segment's steps (a silent one when not ``enabled``)."""
    from tqdm import tqdm

    return tqdm(total=end - start, initial=0, desc=f"steps {start}-{end}", disable=not enabled,
                unit="step", dynamic_ncols=True)
