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

from engine.store import storage
from engine.store.commit import read_manifest
from engine.task.definition import TaskDefinition
from engine.task.validation import TaskValidationError, cross_field_problems
from engine.train.plan import TrainingPlan
from flows import artifacts
from tasks.cache import build_cache
from tasks.dataset import prepare_dataset
from tasks.publish import publish
from tasks.segment import backstop_timeout, dispatch_segment, train_segment
from tasks.validation import validate_final


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


@flow(name="finetune")
def finetune(
    task: TaskDefinition,
    output_dir: str,
    cache_dir: str | None = None,
    data_dir: str | None = None,
    budget_seconds: float | None = None,
    segment_deployment: str | None = None,
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
    """
    logger = get_run_logger()
    check_task(task)
    output_dir = resolve_output_dir(output_dir)
    dataset = prepare_dataset(task, data_dir)
    cache = build_cache(task, dataset, data_dir, cache_dir)
    logger.info(
        "dataset %s: %d examples (hash %s); cache %s (%s)",
        dataset["address"], dataset["count"], dataset["content_hash"][:12], cache["address"],
        "built now" if cache["built_now"] else "found",
    )

    if dataset["skipped"]:
        logger.warning(
            "%d image(s) skipped while preparing the dataset, e.g. %s",
            dataset["skipped"], dataset["skipped_examples"][:3],
        )

    plan = TrainingPlan.for_task(task, dataset["count"])
    budget = budget_seconds or task.train_args.segment_budget_seconds
    step = start_step_of(task)
    progress = artifacts.start_progress(output_dir, step, plan.total_steps)

    checkpoint = task.checkpoint
    segments: list[dict] = []
    # every segment trains at least one step or raises, so this bound is never reached
    for index in range(plan.total_steps - step + 1):
        name = segment_run_name(index, step, plan.segment_end(step))
        if segment_deployment:
            result = dispatch_segment.with_options(task_run_name=name)(
                segment_deployment, task, index, output_dir, checkpoint, dataset,
                data_dir=data_dir, cache_dir=cache_dir, budget_seconds=budget, name=name,
            )
        else:
            result = train_segment.with_options(
                task_run_name=name, timeout_seconds=backstop_timeout(budget)
            )(
                task, index, output_dir, checkpoint, dataset,
                data_dir=data_dir, cache_dir=cache_dir, budget_seconds=budget,
            )
        segments.append(result)
        checkpoint, step = result["checkpoint"], result["global_step"]
        artifacts.show_progress(progress, step, plan.total_steps)
        artifacts.show_segments(output_dir, segments)
        if result["finished"]:
            break
    else:  # pragma: no cover - guarded by the engine (BudgetTooShortError)
        raise RuntimeError(f"training did not finish after {len(segments)} segments")

    images = validate_final.with_options(task_run_name=f"validate step {step}")(
        task, checkpoint, output_dir, dataset, data_dir=data_dir
    )
    summary = {
        "output_dir": output_dir,
        "checkpoint": checkpoint,
        "global_step": step,
        "total_steps": plan.total_steps,
        "segments": len(segments),
        "dataset_hash": dataset["content_hash"],
        "cache": {"address": cache["address"], "built_now": cache["built_now"]},
    }
    run_summary = {
        **summary,
        "dataset": {k: dataset[k] for k in ("count", "skipped", "skipped_examples",
                                            "empty_captions")},
        "run_name": storage.basename(output_dir),
        "flow_run_id": flow_run.id,
        "flow_run_name": flow_run.name,
        "segment_results": [_short(s) for s in segments],
    }
    published = publish.with_options(task_run_name=f"publish step {step}")(
        task, checkpoint, output_dir, dataset, images,
        [s["metrics"] for s in segments if s.get("metrics")], run_summary, data_dir=data_dir,
    )
    artifacts.show_result(output_dir, summary, published, images)
    logger.info("LoRA published to %s", storage.redact(published["lora_dir"]))
    return {
        **summary,
        "lora": published,
        "validation": images,
        "segment_results": [_short(s) for s in segments],
    }


def _short(segment: dict) -> dict:
    """The part of a segment result worth keeping in the run summary."""
    keys = ("index", "start_step", "global_step", "steps_done", "stopped_by", "seconds",
            "loss", "samples_per_second", "checkpoint", "metrics")
    return {k: segment.get(k) for k in keys}


@flow(name="finetune-segment")
def finetune_segment(
    task: TaskDefinition,
    index: int,
    output_dir: str,
    checkpoint: str | None,
    dataset: dict,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    budget_seconds: float | None = None,
    name: str = "segment",
) -> dict:
    """One segment as its own flow run, for ``finetune(segment_deployment=...)``.

    Served by every GPU worker (``loraflow serve-segments`` or a work pool deployment);
    whichever is free picks the next segment up. Its summary is also written to the
    segment folder (``result.json``), which is how the orchestrating run reads it.
    """
    return train_segment.with_options(
        task_run_name=name, timeout_seconds=backstop_timeout(budget_seconds)
    )(
        task, index, output_dir, checkpoint, dataset,
        data_dir=data_dir, cache_dir=cache_dir, budget_seconds=budget_seconds,
    )
