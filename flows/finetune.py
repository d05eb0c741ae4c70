"""The fine-tuning flow: dataset -> cache -> segments until FINISH -> validation -> publish.

Each step is a small task in ``tasks/``; between them travel only addresses, hashes and
small summaries. Segments are time-boxed: each trains until its planned steps are done
or its budget is nearly spent, commits a checkpoint and hands its address to the next.
A segment that fails is retried by Prefect from the same input checkpoint; a flow run
that is retried skips every step that completed (run-scoped cache keys, see
``tasks/__init__.py``), and a new run into the same output folder finds the committed
segments and trains only what is missing.

No ``from __future__ import annotations`` here: Prefect builds the parameter model of a
flow from its annotations, and a worker that loads the flow from its entrypoint cannot
resolve string annotations such as ``"TaskDefinition"`` (the run fails validation).
"""


from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from engine.data.epoch_summary import summary_lines
from engine.data.prepared import load_dataset_for_task
from engine.store import storage
from engine.store.commit import read_manifest
from engine.task.definition import TaskDefinition
from engine.task.validation import TaskValidationError, cross_field_problems
from engine.train.plan import TrainingPlan
from flows import artifacts
from flows.run_names import readable_run_name
from flows.validation_steps import StepValidations, run_rows
from tasks.cache import build_cache
from tasks.caption import add_captions, caption_counts
from tasks.class_images import add_class_images
from tasks.dataset import prepare_dataset
from tasks.payloads import (
    CacheSummary,
    DatasetSummary,
    PublishResult,
    RunSummary,
    SegmentRequest,
    SegmentSummary,
    ValidationResult,
)
from tasks.publish import publish
from tasks.segment import backstop_timeout, dispatch_segment, train_segment
from tasks.segment_processes import checked_processes
from tasks.user_errors import hide_user_error_tracebacks
from tasks.validation import validate_final

# A bad-input failure is logged by Prefect as one line, not a traceback (here too: a
# worker that runs these flows imports this module, not the CLI).
hide_user_error_tracebacks()


def segment_run_name(index: int, start_step: int, end_step: int) -> str:
    """``segment-3 steps 300-400``: the planned range, visible in the UI's task list."""
    return f"segment-{index} steps {start_step}-{end_step}"


def start_step_of(task: TaskDefinition) -> int:
    """Where training starts: 0, or the step of the checkpoint the task resumes from."""
    return read_manifest(task.checkpoint).global_step if task.checkpoint else 0


def resolve_output_dir(output_dir: str) -> str:
    """Fill ``{date}`` and ``{flow_run_name}`` so each scheduled run gets its own folder.

    Both are fixed for a flow run (``{date}`` is its scheduled start, UTC), so a retry
    of the run writes to the same folder and finds the segments it already committed.
    """
    if "{" not in output_dir:
        return output_dir
    scheduled = flow_run.scheduled_start_time
    values = {
        "{date}": scheduled.strftime("%Y-%m-%d") if scheduled else "",
        "{flow_run_name}": flow_run.name or "",
    }
    for placeholder, value in values.items():
        output_dir = output_dir.replace(placeholder, value)
    return output_dir


def check_task(task: TaskDefinition) -> None:
    """Refuse what the schema cannot say (rules between fields) before any heavy work.

    Prefect has already validated the parameter against the model (types, ranges,
    unknown keys); a run started from the UI or the API gets the same checks as
    ``loraflow validate``.
    """
    problems = cross_field_problems(task)
    if problems:
        raise TaskValidationError(problems, "task")


def name_this_run() -> str:
    """The flow run's name in the UI: ``quickstart-2026-12-01-2315`` (see flows.run_names).

    From the parameters and the scheduled start, both fixed for a flow run: a retry gets
    the same name again (and ``{flow_run_name}`` in ``output_dir`` the same folder).
    """
    parameters = flow_run.parameters
    try:
        return readable_run_name(str(parameters.get("output_dir") or ""),
                                 parameters.get("task"), flow_run.scheduled_start_time)
    except Exception:  # noqa: BLE001 - a name must never fail a run (Prefect would fail it)
        return readable_run_name("", None, flow_run.scheduled_start_time)


@flow(name="finetune", flow_run_name=name_this_run)
def finetune(
    task: TaskDefinition,
    output_dir: str,
    cache_dir: str | None = None,
    data_dir: str | None = None,
    budget_seconds: float | None = None,
    segment_deployment: str | None = None,
    overrides: list[str] | None = None,
    processes_per_segment: int | None = None,
) -> dict:
    """Fine-tune a LoRA for ``task``; publish it under ``output_dir``/lora.

    Args:
        task: the task definition (the UI renders its form from the same schema).
        output_dir: run folder, a path or fsspec URL (``s3://bucket/runs/x``); segments
            write ``segments/NNNN/``, validation ``validation/``, publishing ``lora/``.
        cache_dir: where latent / caption caches are kept (default: per worker,
            ``$LORAFLOW_HOME/cache``); share one on S3 between workers.
        data_dir: where prepared datasets are kept (default ``$LORAFLOW_HOME/datasets``).
        budget_seconds: wall-clock budget of each segment; default
            ``task.train_args.segment_budget_seconds`` (none: segments end by steps).
        segment_deployment: run each segment as a flow run of this deployment of
            ``finetune-segment`` (e.g. ``finetune-segment/gpu``), so segments land on
            whichever worker is free; default: in this flow run's process. Needs
            ``output_dir`` (and ideally ``cache_dir``) on storage every worker sees.
        overrides: the ``key.path=value`` overrides already applied to ``task`` (by
            ``loraflow run task.json lora.rank=16``): recorded in the run summary, so
            the run says how it differs from its task file.
        processes_per_segment: train each segment with this many processes on its
            machine (``loraflow segment --nproc-per-node``: one per GPU, gloo on CPU);
            default one, in the segment task's own process (docs/distributed.md).

    Returns:
        the run summary (JSON-able): totals, ``lora`` (the published URLs; for a
        full fine-tune ``model`` instead, and ``training_type: "full"``),
        ``validation`` (image URLs) and ``segment_results`` (one row per segment).
    """
    logger = get_run_logger()
    check_task(task)
    processes_per_segment = checked_processes(processes_per_segment)  # 1: None, one process
    output_dir = resolve_output_dir(output_dir)
    dataset: DatasetSummary = prepare_dataset(task, data_dir)
    dataset, captions = add_captions(task, dataset, data_dir)  # captioning: images get text
    if captions is not None:
        artifacts.show_captions(output_dir, task.captioning.model, captions)
    dataset, class_images = add_class_images(task, dataset, data_dir)  # DreamBooth's subset
    cache: CacheSummary = build_cache(task, dataset, data_dir, cache_dir)
    logger.info(
        "dataset %s: %d examples (hash %s); cache %s (%s)",
        dataset.address, dataset.count, dataset.content_hash[:12], cache.address,
        "built now" if cache.built_now else "found",
    )
    if dataset.skipped:
        logger.warning(
            "%d image(s) skipped while preparing the dataset, e.g. %s",
            dataset.skipped, dataset.skipped_examples[:3],
        )
    if dataset.epoch is not None:
        logger.info("\n".join(summary_lines(dataset.epoch)))
        artifacts.show_data(output_dir, dataset.epoch)

    plan = TrainingPlan.for_task(task, load_dataset_for_task(task, data_dir))  # buckets, repeats
    step_validations = StepValidations(task, output_dir, dataset, data_dir,
                                       concurrent=segment_deployment is not None)
    segments = train_all_segments(
        task, plan, output_dir, dataset, cache_dir=cache_dir, data_dir=data_dir,
        budget_seconds=budget_seconds or task.train_args.segment_budget_seconds,
        segment_deployment=segment_deployment, step_validations=step_validations,
        processes_per_segment=processes_per_segment,
    )
    validated_steps = step_validations.wait()
    final = segments[-1].result
    checkpoint, step = final.checkpoint, final.global_step
    validation: ValidationResult = validate_final.with_options(
        task_run_name=f"validate step {step}"
    )(task, checkpoint, output_dir, dataset, data_dir=data_dir)
    summary = RunSummary(
        output_dir=output_dir,
        checkpoint=checkpoint,
        global_step=step,
        total_steps=plan.total_steps,
        segments=len(segments),
        dataset_hash=dataset.content_hash,
        cache={"address": cache.address, "built_now": cache.built_now},
        dataset={**dataset.counts(), **({"class_images": class_images} if class_images else {}),
                 **({"captions": caption_counts(captions)} if captions else {})},
        run_name=storage.basename(output_dir),
        flow_run_id=flow_run.id,
        flow_run_name=flow_run.name,
        segment_results=[s.row() for s in segments],
        overrides=[storage.redact(text) for text in overrides or []],
    )
    published: PublishResult = publish.with_options(task_run_name=f"publish step {step}")(
        task, checkpoint, output_dir, dataset, validation,
        [s.result.metrics for s in segments if s.result.metrics], summary, data_dir=data_dir,
    )
    artifacts.show_result(summary, published, validation)
    logger.info("%s published to %s", "Full fine-tune" if published.training_type == "full"
                else "LoRA", storage.redact(published.folder))
    result = run_result(summary, published, validation)
    if task.validation.validation_steps:
        result["validation_steps"] = run_rows(validated_steps)
    return result


def train_all_segments(
    task: TaskDefinition, plan: TrainingPlan, output_dir: str, dataset: DatasetSummary, *,
    cache_dir: str | None, data_dir: str | None, budget_seconds: float | None,
    segment_deployment: str | None, step_validations: StepValidations | None = None,
    processes_per_segment: int | None = None,
) -> list[SegmentSummary]:
    """Segments, each from the previous one's checkpoint, until the training is finished.

    Here or, with ``segment_deployment``, each on whichever worker serves it. The UI's
    progress bar moves while a segment trains (the segment updates it by id, from
    whichever process it runs in); the segment table and the loss / lr chart are
    updated after each segment. ``step_validations`` is handed each segment as it
    returns (validation every N steps, outside the segment: flows/validation_steps.py).
    """
    step = start_step_of(task)
    progress = artifacts.start_progress(output_dir, step, plan.total_steps)
    checkpoint = task.checkpoint
    segments: list[SegmentSummary] = []
    # every segment trains at least one step or raises, so this bound is never reached
    for index in range(plan.total_steps - step + 1):
        name = segment_run_name(index, step, plan.segment_end(step))
        request = SegmentRequest(
            task=task, index=index, output_dir=output_dir, checkpoint=checkpoint,
            dataset=dataset, data_dir=data_dir, cache_dir=cache_dir,
            budget_seconds=budget_seconds, processes_per_segment=processes_per_segment,
        )
        if segment_deployment:
            segment = dispatch_segment.with_options(task_run_name=name)(
                segment_deployment, request, name, progress_artifact=str(progress)
            )
        else:
            segment = train_segment.with_options(
                task_run_name=name, timeout_seconds=backstop_timeout(budget_seconds)
            )(request, progress_artifact=str(progress))
        segments.append(segment)
        checkpoint, step = segment.result.checkpoint, segment.result.global_step
        artifacts.show_progress(progress, step, plan.total_steps)
        artifacts.show_segments(output_dir, segments)
        artifacts.show_curve(output_dir, segments)
        if step_validations is not None:
            step_validations.after_segment(segment)
        if segment.result.finished:
            return segments
    raise RuntimeError(  # pragma: no cover - guarded by the engine (BudgetTooShortError)
        f"training did not finish after {len(segments)} segments"
    )


def run_result(summary: RunSummary, published: PublishResult,
               validation: ValidationResult) -> dict:
    """The flow's return value: what ``loraflow run`` prints and ``retry`` hands back."""
    totals = summary.model_dump(include={
        "output_dir", "checkpoint", "global_step", "total_steps", "segments",
        "dataset_hash", "cache", "overrides",
    })
    return {
        **totals,
        "dataset": dict(summary.dataset),
        # a full fine-tune publishes a whole model (model/), not a LoRA
        **({"training_type": "full", "model": published.model_dump(mode="json")}
           if published.training_type == "full"
           else {"lora": published.model_dump(mode="json")}),
        "validation": list(validation.images),
        "segment_results": list(summary.segment_results),
    }


@flow(name="finetune-segment")
def finetune_segment(request: SegmentRequest, name: str = "segment",
                     progress_artifact: str | None = None,
                     processes_per_segment: int | None = None) -> SegmentSummary:
    """One segment as its own flow run, for ``finetune(segment_deployment=...)``.

    Served by every GPU worker (``loraflow serve-segments`` or a work pool deployment);
    whichever is free picks the next segment up. Its summary is also written to the
    segment folder (``result.json``), which is how the orchestrating run reads it.
    ``name`` names the segment's task run (``segment-3 steps 300-400``);
    ``progress_artifact`` is the orchestrating run's progress bar, moved as it trains.
    ``processes_per_segment``, when given (a multi-GPU worker's deployment sets it to its
    GPU count), replaces the request's: 1 trains in this process, N with N processes.
    """
    if processes_per_segment is not None:
        request = request.model_copy(
            update={"processes_per_segment": checked_processes(processes_per_segment)})
    return train_segment.with_options(
        task_run_name=name, timeout_seconds=backstop_timeout(request.budget_seconds)
    )(request, progress_artifact=progress_artifact)
