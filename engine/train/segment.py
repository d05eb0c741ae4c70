"""One segment of a fine-tuning task: resume, train until a stop, commit, validate.

A segment stops at the first of: its own steps (num_train_steps, or num_train_epochs of
steps) done; the whole training done (then the checkpoint is marked FINISH); its time
budget about to run out; a stop request (SIGTERM). Whatever stopped it, it commits a
complete checkpoint first.

:func:`run_segment` is the recipe, read top to bottom; the rooms it calls each hold one
idea: :mod:`~engine.train.resume` (where to start), :mod:`~engine.train.trainer` (the
state and the step), :mod:`~engine.train.loop` (the loop), :mod:`~engine.train.saver`
(checkpoints), :mod:`~engine.infer.validation` (images), :mod:`~engine.train.options`
(what goes in and comes out).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from engine.data.class_subset import class_subset_names
from engine.data.epoch_summary import epoch_summary
from engine.data.prepared import load_dataset_for_task, model_identity
from engine.data.training_data import TrainingData
from engine.errors import BudgetTooShortError, LoraflowError
from engine.infer import validation
from engine.lora.metadata import subset_names
from engine.model.loading import load_base_model, training_device
from engine.task.definition import TaskDefinition
from engine.train.cache import ensure_cache
from engine.train.clock import SegmentClock
from engine.train.determinism import apply_kernel_mode, resume_warnings
from engine.train.digests import segment_trail
from engine.train.distributed import join_world, rank_zero_first
from engine.train.loop import train
from engine.train.metrics import MetricsLog
from engine.train.optimizers import check_optimizer
from engine.train.options import SegmentOptions, SegmentResult, StepReport, StopReason
from engine.train.phases import phase
from engine.train.plan import TrainingPlan
from engine.train.resume import already_committed, load_resume_point, newest_intermediate, restore
from engine.train.samples import SampleSource
from engine.train.saver import CheckpointSaver, checkpoint_files, segment_dir_of
from engine.train.state import training_identity
from engine.train.stream import batch_stream, micro_batch_stream
from engine.train.trainer import Trainer, build_trainer, train_step

log = logging.getLogger(__name__)


def run_segment(task: TaskDefinition, output_dir: str,
                opts: SegmentOptions | None = None) -> SegmentResult:
    """Run one segment of ``task``, writing ``output_dir``/checkpoint and /validation."""
    opts = opts or SegmentOptions()
    budget = opts.budget_seconds or task.train_args.segment_budget_seconds
    clock = SegmentClock(budget, started_at=opts.started_at or time.monotonic())
    world = join_world(training_device())  # torchrun's processes (data parallel), or one

    # -- where to start: refused or returned before any model is loaded
    checkpoint_in = opts.checkpoint or task.checkpoint
    check_optimizer(task, training_device())  # its library installed, runs on this device
    with phase("dataset: open and verify"):
        dataset = load_dataset_for_task(task, opts.data_root, progress=opts.progress)
        plan = TrainingPlan.for_task(task, dataset)
        identity = training_identity(task, dataset.content_hash, dataset.subset_hashes)
    with phase("resume point"):
        given = load_resume_point(checkpoint_in, identity) if checkpoint_in else None
        start_step = given.global_step if given else 0
        done = already_committed(output_dir, identity, start_step, plan, clock)
    if done is not None:
        return done

    # -- set up: the model, the trainer at its starting point, the data
    with phase("model loading"):
        apply_kernel_mode(task.train_args.deterministic, training_device())  # before CUDA work
        base = load_base_model(task, training_device())
    with phase("adapter set-up"):
        trainer = build_trainer(task, base, plan)
        trainer.world = world
    with phase("checkpoint restore"):
        resume_from = newest_intermediate(output_dir, identity, start_step) or given
        previous = restore(trainer, resume_from) if resume_from else {}
        warnings = resume_warnings(resume_from.meta, base.device) if resume_from else []
    start, end = trainer.global_step, plan.segment_end(start_step)
    clock.resume_from(previous.get("seconds_per_step"))
    _expect_after_save(clock, task, plan, opts.validate, checkpoint_in)
    cache = None
    if task.trains_text_encoder:
        log.info("training a text-encoder LoRA: captions are encoded every step (latents "
                 "can still come from the cache)")
    with phase("cache opening"):
        if opts.cache_root:
            cache = rank_zero_first(world, lambda: ensure_cache(  # built once, by rank 0
                task, base, dataset, opts.cache_root, model_identity(base), progress=None))
        source = SampleSource(task, dataset, base, cache)
    metrics = MetricsLog()
    ta = task.train_args
    saver = CheckpointSaver(output_dir, identity, start_step, clock, ta.checkpointing_steps,
                            ta.checkpoints_total_limit, world=world,
                            trail=segment_trail(task, trainer, resume_from, start_step, end))

    # -- train, then commit whatever stopped it
    if start >= plan.total_steps:
        stopped_by = StopReason.FINISHED
    else:
        with phase("training steps"):
            stopped_by = train(
                trainer, source, end, clock=clock, saver=saver, metrics=metrics,
                workers=task.dataloader_num_workers, should_stop=opts.should_stop,
                on_step=opts.on_step, progress=opts.progress,
            )
    if trainer.global_step == start and stopped_by is StopReason.BUDGET:
        raise BudgetTooShortError(
            f"the time budget of {budget:.1f} s leaves no room for one step and a checkpoint "
            f"save ({clock.elapsed():.1f} s went to start-up); nothing was written. Give the "
            "segment a longer budget."
        )
    with phase("checkpoint save"):
        checkpoint_url = saver.save_final(trainer)

    # -- what the segment leaves beside its checkpoint
    images: list[str] = []
    if opts.validate and world.writes:  # only rank 0 writes
        images = validation.validate_in_segment(task, base, trainer.prediction_type, dataset,
                                                output_dir, trainer.global_step)
    with phase("metrics flush"):
        metrics_url = metrics.publish(output_dir) if metrics.records and world.writes else None
        metrics.close()
    return SegmentResult(
        steps_done=trainer.global_step - start_step, start_step=start_step,
        global_step=trainer.global_step, total_steps=plan.total_steps,
        finished=trainer.finished, stopped_by=stopped_by,
        seconds=round(clock.elapsed(), 3), checkpoint=checkpoint_url, validation=images,
        metrics=metrics_url, cache=cache.address if cache else None,
        skipped_images=list(dataset.manifest.get("skipped", [])),
        data=data_summary(task, dataset, plan), warnings=warnings,
    )


def data_summary(task: TaskDefinition, dataset: TrainingData, plan: TrainingPlan) -> dict:
    """What one epoch of ``dataset`` holds, as a JSON-able dict (see SegmentResult.data).

    Counted from the data at the plan's batch size; it agrees with the plan's epochs
    (uses and micro-batches), which tests/engine/train/test_datasets_resume.py checks.
    """
    summary = epoch_summary(dataset, plan.batch_size,
                            subset_names(task) + class_subset_names(task),
                            dataset.manifest.get("skipped", []))
    return asdict(summary)


def _expect_after_save(clock: SegmentClock, task: TaskDefinition, plan: TrainingPlan,
                       validate: bool, checkpoint_in: str | None) -> None:
    """Tell the clock what follows the final save: nothing, or validation, timed by the
    previous segment (its validation/prompts.json) or else estimated from the step time."""
    if not validate:
        clock.expect_after_save(0.0)
        return
    measured = validation.measured_seconds(segment_dir_of(checkpoint_in)) if checkpoint_in else None
    clock.expect_after_save(measured, unet_passes=validation.unet_passes(task),
                            samples_per_step=plan.batch_size * plan.accumulation)


#: The segment's public names; the trainer's, loop's and saver's are re-exported for
#: callers written before the split (the benchmark, tasks, tests): import them from
#: their own modules in new code.
__all__ = [
    "CheckpointSaver",
    "LoraflowError",
    "SegmentOptions",
    "SegmentResult",
    "StepReport",
    "StopReason",
    "Trainer",
    "build_trainer",
    "checkpoint_files",
    "batch_stream",
    "micro_batch_stream",
    "restore",
    "run_segment",
    "train_step",
]
