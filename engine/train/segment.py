"""One segment of a fine-tuning task: resume, train until a stop, commit, validate.

A segment stops at the first of: its own steps (num_train_steps, or num_train_epochs of
steps) done; the whole training done (then the checkpoint is marked FINISH); its time
budget about to run out; a stop request (SIGTERM). Whatever stopped it, it commits a
complete checkpoint first. The loop in :func:`train` is the whole training step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from engine.data.prepared import load_dataset_for_task, model_identity
from engine.errors import BudgetTooShortError, LoraflowError
from engine.infer.validation import render_validation, validation_prompts, write_validation
from engine.lora.weights import LORA_FILE, lora_file_bytes, restore_lora
from engine.model.family import unet_extra_inputs
from engine.model.loading import (
    BaseModel,
    add_lora_adapters,
    load_base_model,
    lora_parameters,
    training_device,
)
from engine.store import storage
from engine.store.commit import (
    CheckpointError,
    commit_checkpoint,
    is_finished,
    list_committed,
    read_checkpoint,
    remove_checkpoint,
    write_finish_marker,
)
from engine.task.definition import TaskDefinition
from engine.train.cache import ensure_cache
from engine.train.clock import SegmentClock
from engine.train.loss import min_snr_weights, per_sample_loss, snr, target_for
from engine.train.metrics import MetricsLog
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource
from engine.train.state import (
    OPTIMIZER_FILE,
    STATE_FILE,
    StateMismatchError,
    fingerprint,
    identity_differences,
    optimizer_files,
    restore_optimizer,
    restore_scheduler,
    scheduler_state,
    training_identity,
)

log = logging.getLogger(__name__)


@dataclass
class SegmentResult:
    """What a caller needs to chain segments: small and JSON-able."""

    steps_done: int
    start_step: int
    global_step: int
    total_steps: int
    finished: bool
    stopped_by: str  # "steps" | "finished" | "budget" | "signal" | "already_done"
    seconds: float
    checkpoint: str
    validation: list[str]
    metrics: str | None
    cache: str | None = None
    skipped_images: list[dict] = field(default_factory=list)  # dataset files not used, why


    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class SegmentOptions:
    """How to run a segment (where, how long), as opposed to what to train (the task)."""

    checkpoint: str | None = None
    budget_seconds: float | None = None
    data_root: str | None = None
    cache_root: str | None = None
    progress: bool = False
    validate: bool = True
    should_stop: Callable[[], bool] = lambda: False
    started_at: float | None = None  # time.monotonic() when the process began
    # test-only fault injection: called after each optimizer step with the global step
    after_step: Callable[[int], None] | None = None


# -- the training state in one place ----------------------------------------------------


@dataclass
class Trainer:
    task: TaskDefinition
    base: BaseModel
    plan: TrainingPlan
    adapted: dict[str, Any]  # {"unet": unet, "text_encoder": ..., ...}: modules with a LoRA
    params: dict[str, torch.nn.Parameter]  # "unet.<name>" -> parameter, stable order
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Any  # torch.amp.GradScaler for fp16 on CUDA, else None
    prediction_type: str
    global_step: int

    def autocast(self):
        if self.base.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.base.device.type, dtype=self.base.dtype)


def build_trainer(task: TaskDefinition, base: BaseModel, plan: TrainingPlan) -> Trainer:
    adapted = add_lora_adapters(base, task)
    ta = task.train_args
    base.unet.to(base.device)
    if ta.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    if ta.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        base.unet.train()  # diffusers checkpoints only in training mode
    scale = ta.gradient_accumulation_steps * ta.batch_size if ta.scale_lr else 1  # one process
    groups, params = [], {}
    for prefix, module in adapted.items():
        named = {f"{prefix}.{n}": p for n, p in lora_parameters(module).items()}
        params |= named
        lr = ta.learning_rate
        if prefix != "unet" and task.lora.text_encoder.learning_rate is not None:
            lr = task.lora.text_encoder.learning_rate
        groups.append({"params": list(named.values()), "lr": lr * scale})
    adam = ta.adam_args
    optimizer = torch.optim.AdamW(
        groups, betas=(adam.beta1, adam.beta2),
        weight_decay=adam.weight_decay, eps=adam.epsilon, foreach=False,
    )
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        ta.lr_scheduler.lr_scheduler, optimizer,
        num_warmup_steps=ta.lr_scheduler.lr_warmup_steps, num_training_steps=plan.total_steps,
    )
    scaler = None
    if base.dtype == torch.float16 and base.device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    prediction = ta.prediction_type or base.noise_scheduler.config.prediction_type
    return Trainer(task, base, plan, adapted, params, optimizer, lr_scheduler, scaler, prediction, 0)


def train_step(tr: Trainer, micro_batches: Iterator[list[Any]], source: SampleSource) -> dict:
    """One optimizer step over the step's micro-batches; returns its metrics."""
    refs = tr.plan.micro_batches(tr.global_step)
    n_samples = sum(len(r) for r in refs)
    loss_total = 0.0
    for _ in refs:
        batch = source.batch(next(micro_batches))
        noisy = tr.base.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        with tr.autocast():
            extra = unet_extra_inputs(tr.base.family, batch.conditioning, batch.time_ids)
            prediction = tr.base.unet(noisy, batch.timesteps, **extra).sample
        target = target_for(tr.base.noise_scheduler, tr.prediction_type, batch.latents, batch.noise, batch.timesteps)
        weights = None
        if tr.task.train_args.snr_gamma is not None:
            snr_t = snr(tr.base.noise_scheduler, batch.timesteps)
            weights = min_snr_weights(snr_t, tr.task.train_args.snr_gamma, tr.prediction_type)
        loss = per_sample_loss(prediction, target, weights).sum() / n_samples
        (tr.scaler.scale(loss) if tr.scaler else loss).backward()
        loss_total += loss.item()
    if tr.scaler:
        tr.scaler.unscale_(tr.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params.values(), tr.task.train_args.max_grad_norm)
    lr = tr.optimizer.param_groups[0]["lr"]
    if tr.scaler:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()
    tr.lr_scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.global_step += 1
    return {"loss": loss_total, "lr": lr, "grad_norm": float(grad_norm), "samples": n_samples}


def stop_reason(tr: Trainer, end: int, clock: SegmentClock, opts: SegmentOptions,
                saver: CheckpointSaver) -> str | None:
    """Why the segment must stop before the next step, or None to go on."""
    if tr.global_step >= end:
        return "finished" if end >= tr.plan.total_steps else "steps"
    if opts.should_stop():
        return "signal"
    if not clock.fits_another_step(saver.state_bytes):
        return "budget"
    return None


def train(tr: Trainer, source: SampleSource, clock: SegmentClock, opts: SegmentOptions,
          metrics: MetricsLog, saver: CheckpointSaver, end: int) -> str:
    """Train until a stop; returns why it stopped. The whole loop, top to bottom."""
    start = tr.global_step
    batches = micro_batch_stream(source, tr.plan, start, end, tr.task.dataloader_num_workers)
    bar = progress_bar(opts.progress, start, end)
    log.info("training steps %d-%d of %d", start, end, tr.plan.total_steps)
    try:
        while True:
            stop = stop_reason(tr, end, clock, opts, saver)
            if stop:
                return stop
            t0 = time.monotonic()
            step_metrics = train_step(tr, batches, source)
            seconds = time.monotonic() - t0
            clock.step_seconds.append(seconds)
            metrics.log({
                "global_step": tr.global_step,
                "epoch": tr.plan.epoch_of(tr.global_step - 1),
                **step_metrics,
                "seconds": seconds,
                "samples_per_second": step_metrics["samples"] / seconds,
            })
            bar.update(1)
            bar.set_postfix(loss=f"{step_metrics['loss']:.4f}")
            if saver.due(tr.global_step, end):
                saver.save_intermediate(tr)
            if opts.after_step is not None:
                opts.after_step(tr.global_step)
    finally:
        batches.close()  # stop data-loader workers now, not at garbage collection
        bar.close()


# -- data ------------------------------------------------------------------------------


class _MicroBatches(torch.utils.data.Dataset):
    """Item k = the prepared samples of the k-th micro-batch of this segment."""

    def __init__(self, source: SampleSource, plan: TrainingPlan, start: int, end: int) -> None:
        self.source = source
        self.refs = [mb for step in range(start, end) for mb in plan.micro_batches(step)]

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, k: int) -> list[Any]:
        return self.source.prepare(self.refs[k])


def micro_batch_stream(source: SampleSource, plan: TrainingPlan, start: int, end: int,
                       workers: int) -> Iterator[list[Any]]:
    """Prepared micro-batches in order; workers (dataloader_num_workers) prepare ahead."""
    dataset = _MicroBatches(source, plan, start, end)
    if workers == 0:
        return (dataset[k] for k in range(len(dataset)))  # a generator: has close()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_as_is, persistent_workers=False,
    )
    return _closing(iter(loader))


def _as_is(item: Any) -> Any:
    return item


def _closing(loader_iter: Any) -> Iterator[list[Any]]:
    """Yield from a worker-backed iterator and stop its workers when training stops.

    A segment usually stops before the loader is exhausted (budget, signal); left to the
    garbage collector, the worker processes are torn down mid-prefetch and torch reports
    them as crashed.
    """
    try:
        yield from loader_iter
    finally:
        shutdown = getattr(loader_iter, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()  # joins the workers; terminates any that do not stop
            except RuntimeError as exc:
                # A worker's exit status seen while it is being stopped: every batch the
                # loop used was already received, so training is unaffected. (Seen when
                # the forked worker inherits exit hooks from its parent, as under pytest.)
                log.warning("a data-loader worker failed while stopping: %s", exc)


def progress_bar(enabled: bool, start: int, end: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=end - start, initial=0, desc=f"steps {start}-{end}", disable=not enabled,
                unit="step", dynamic_ncols=True)


# -- checkpoints -----------------------------------------------------------------------


def checkpoint_files(tr: Trainer, extra_state: dict[str, Any]) -> dict[str, bytes]:
    names = list(tr.params)
    moments, groups = optimizer_files(tr.optimizer, names)
    state = {
        "global_step": tr.global_step,
        "epoch": tr.plan.epoch_of(tr.global_step),
        "step_in_epoch": tr.plan.step_in_epoch(tr.global_step),
        "total_steps": tr.plan.total_steps,
        "optimizer": groups,
        "lr_scheduler": scheduler_state(tr.lr_scheduler),
        "grad_scaler": tr.scaler.state_dict() if tr.scaler else None,
        **extra_state,
    }
    return {
        LORA_FILE: lora_file_bytes(
            _pipeline_class(tr.base), tr.base.unet,
            {k: v for k, v in tr.adapted.items() if k != "unet"},
        ),
        OPTIMIZER_FILE: moments,
        STATE_FILE: json.dumps(state, indent=2, sort_keys=True).encode(),
    }


INTERMEDIATE_DIR = "checkpoints"


def checkpoint_state(loaded: Any) -> dict[str, Any]:
    """The checkpoint's training_state.json; missing or not JSON is a CheckpointError."""
    try:
        state = json.loads(loaded.files[STATE_FILE])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint at {loaded.url} has no readable {STATE_FILE}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint at {loaded.url}: {STATE_FILE} is not an object")
    return state


@dataclass
class CheckpointSaver:
    """Commits this segment's checkpoints: in-segment ones every N steps, and the last.

    In-segment checkpoints go to ``output_dir/checkpoints/step-NNNNNNNN`` (the newest
    ``checkpoints_total_limit`` are kept, older ones deleted only after a newer commit);
    the segment's result goes to ``output_dir/checkpoint`` as Crynux nodes expect.
    """

    output_dir: str
    identity: dict[str, Any]
    segment_start: int
    clock: SegmentClock
    every: int | None
    keep: int | None
    previous: dict[str, Any]
    state_bytes: int = 0

    def due(self, step: int, end: int) -> bool:
        return bool(self.every) and step < end and (step - self.segment_start) % self.every == 0

    def commit(self, tr: Trainer, url: str) -> str:
        t0 = time.monotonic()
        steps = self.clock.step_seconds
        files = checkpoint_files(tr, {
            "identity": self.identity,
            "task_fingerprint": fingerprint(self.identity),
            "started_from_step": self.segment_start,
            "seconds_per_step": max(steps[-20:]) if steps else self.previous.get("seconds_per_step"),
        })
        commit_checkpoint(url, files, meta={
            "global_step": tr.global_step, "task_fingerprint": fingerprint(self.identity),
            "finished": tr.global_step >= tr.plan.total_steps,
        })
        self.clock.save_seconds = time.monotonic() - t0
        log.info("committed %s at step %d (%.2f s)", url, tr.global_step, self.clock.save_seconds)
        return url

    def save_intermediate(self, tr: Trainer) -> None:
        root = storage.join(self.output_dir, INTERMEDIATE_DIR)
        self.commit(tr, storage.join(root, f"step-{tr.global_step:08d}"))
        if self.keep:
            for old in list_committed(root)[: -self.keep]:
                remove_checkpoint(old)  # uncommit first: a kill mid-delete leaves no torn one

    def save_final(self, tr: Trainer) -> str:
        return self.commit(tr, storage.join(self.output_dir, "checkpoint"))


def _matching(url: str, identity: dict[str, Any]) -> Any | None:
    """The verified checkpoint at ``url`` if it belongs to this training, else None."""
    try:
        loaded = read_checkpoint(url)
    except CheckpointError as exc:
        log.warning("skipping checkpoint %s: %s", url, exc)
        return None
    state = checkpoint_state(loaded)
    return loaded if state.get("task_fingerprint") == fingerprint(identity) else None


def newest_intermediate(output_dir: str, identity: dict[str, Any], segment_start: int) -> Any | None:
    """This segment's own newest in-segment checkpoint, left by an attempt that was killed."""
    root = storage.join(output_dir, INTERMEDIATE_DIR)
    for url in reversed(list_committed(root)):
        loaded = _matching(url, identity)
        if loaded and checkpoint_state(loaded).get("started_from_step") == segment_start:
            return loaded
    return None


def _pipeline_class(base: BaseModel) -> Any:
    import diffusers

    return getattr(diffusers, base.family.pipeline_class)


def restore(tr: Trainer, loaded: Any) -> dict[str, Any]:
    """Put the checkpoint's state into the trainer; a malformed file is a CheckpointError.

    The manifest proves the files are the ones written, not that the writer was honest:
    a file that is not valid safetensors/JSON is refused (never unpickled), not a crash.
    """
    try:
        state = checkpoint_state(loaded)
        restore_lora(loaded.files[LORA_FILE], tr.adapted)
        restore_optimizer(tr.optimizer, list(tr.params), loaded.files[OPTIMIZER_FILE],
                          state["optimizer"])
        restore_scheduler(tr.lr_scheduler, state["lr_scheduler"])
        if tr.scaler and state.get("grad_scaler"):
            tr.scaler.load_state_dict(state["grad_scaler"])
        tr.global_step = int(state["global_step"])
    except LoraflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed content is the same refusal
        raise CheckpointError(
            f"checkpoint at {loaded.url} is malformed: {type(exc).__name__}: {exc}"
        ) from None
    return state


def _fallback_for(url: str, identity: dict[str, Any]) -> Any | None:
    parent = url.rstrip("/").rsplit("/", 1)[0]
    for candidate in reversed(list_committed(storage.join(parent, INTERMEDIATE_DIR))):
        loaded = _matching(candidate, identity)
        if loaded is not None:
            return loaded
    return None


def already_committed(output_dir: str, identity: dict[str, Any], start_step: int,
                      plan: TrainingPlan, clock: SegmentClock) -> SegmentResult | None:
    """The result of this very segment if an earlier attempt already committed it.

    Running a segment again with the same task and input checkpoint finds its committed
    output and returns it (a retried Prefect task, a re-sent network task): idempotence.
    """
    url = storage.join(output_dir, "checkpoint")
    try:
        loaded = read_checkpoint(url)
    except CheckpointError:
        return None
    state = checkpoint_state(loaded)
    if state.get("task_fingerprint") != fingerprint(identity) or state.get("started_from_step") != start_step:
        return None
    if loaded.finished and not is_finished(url):  # killed between manifest and marker
        write_finish_marker(url)
    log.info("segment already committed at %s (step %d); nothing to do", url, loaded.global_step)
    validation_dir = storage.join(output_dir, "validation")
    images = [storage.join(validation_dir, name) for name in storage.list_files(validation_dir)
              if name.endswith(".png")]
    metrics = storage.join(output_dir, "metrics", "metrics.jsonl")
    return SegmentResult(
        steps_done=loaded.global_step - start_step, start_step=start_step,
        global_step=loaded.global_step, total_steps=plan.total_steps, finished=loaded.finished,
        stopped_by="already_done", seconds=round(clock.elapsed(), 3), checkpoint=url,
        validation=images, metrics=metrics if storage.exists(metrics) else None,
    )


def load_resume_point(url: str, identity: dict[str, Any]) -> Any:
    """Read and verify the previous checkpoint; refuse one from a different task.

    A damaged checkpoint (missing or edited manifest, flipped byte, truncated file) is
    replaced by the newest good in-segment checkpoint kept beside it, if any: training
    then redoes the lost steps and, being deterministic, reaches the same result.
    """
    try:
        loaded = read_checkpoint(url)
    except CheckpointError as exc:
        fallback = _fallback_for(url, identity)
        if fallback is None:
            raise CheckpointError(f"{exc}; no earlier committed checkpoint is kept beside it "
                                  f"to fall back to") from None
        log.warning("%s; falling back to %s (step %d)", exc, fallback.url, fallback.global_step)
        return fallback
    state = checkpoint_state(loaded)
    differences = identity_differences(state.get("identity", {}), identity)
    if differences:
        raise StateMismatchError(
            f"checkpoint {url} belongs to a different task; it differs in:\n  "
            + "\n  ".join(differences[:10])
        )
    return loaded


# -- the segment -----------------------------------------------------------------------


def run_segment(task: TaskDefinition, output_dir: str, opts: SegmentOptions | None = None) -> SegmentResult:
    """Run one segment of ``task``, writing ``output_dir``/checkpoint and /validation."""
    opts = opts or SegmentOptions()
    budget = opts.budget_seconds or task.train_args.segment_budget_seconds
    clock = SegmentClock(budget, started_at=opts.started_at or time.monotonic())
    checkpoint_in = opts.checkpoint or task.checkpoint
    dataset = load_dataset_for_task(task, opts.data_root, progress=opts.progress)
    plan = TrainingPlan.for_task(task, len(dataset))
    identity = training_identity(task, dataset.content_hash)
    loaded = load_resume_point(checkpoint_in, identity) if checkpoint_in else None
    start_step = loaded.global_step if loaded else 0
    done = already_committed(output_dir, identity, start_step, plan, clock)
    if done is not None:
        return done

    device = training_device()
    base = load_base_model(task, device)
    trainer = build_trainer(task, base, plan)
    loaded = newest_intermediate(output_dir, identity, start_step) or loaded
    previous: dict[str, Any] = restore(trainer, loaded) if loaded else {}
    start, end = trainer.global_step, plan.segment_end(start_step)
    clock.known_step_seconds = previous.get("seconds_per_step")
    plan_validation(clock, task, opts.validate, checkpoint_in)

    cache = None
    if task.lora.text_encoder is not None:
        log.info("training a text-encoder LoRA: captions are encoded every step (latents "
                 "can still come from the cache)")
    if opts.cache_root:
        cache = ensure_cache(task, base, dataset, opts.cache_root, model_identity(base), progress=None)
    source = SampleSource(task, dataset, base, cache)
    metrics = MetricsLog()
    ta = task.train_args
    saver = CheckpointSaver(output_dir, identity, start_step, clock, ta.checkpointing_steps,
                            ta.checkpoints_total_limit, previous,
                            state_bytes=sum(p.numel() * 4 * 3 for p in trainer.params.values()))
    stopped_by = "finished" if start >= plan.total_steps else train(trainer, source, clock, opts, metrics, saver, end)
    if trainer.global_step == start and stopped_by == "budget":
        raise BudgetTooShortError(
            f"the time budget of {budget:.1f} s leaves no room for one step and a checkpoint "
            f"save ({clock.elapsed():.1f} s went to start-up); nothing was written. Give the "
            "segment a longer budget."
        )
    finished = trainer.global_step >= plan.total_steps
    checkpoint_url = saver.save_final(trainer)

    images: list[str] = []
    if opts.validate:
        images = run_validation(task, base, dataset, trainer, output_dir)
    metrics_url = metrics.publish(output_dir) if metrics.records else None
    metrics.close()
    return SegmentResult(
        steps_done=trainer.global_step - start_step, start_step=start_step, global_step=trainer.global_step,
        total_steps=plan.total_steps, finished=finished, stopped_by=stopped_by,
        seconds=round(clock.elapsed(), 3), checkpoint=checkpoint_url, validation=images,
        metrics=metrics_url, cache=cache.address if cache else None,
        skipped_images=list(dataset.manifest.get("skipped", [])),
    )


def plan_validation(clock: SegmentClock, task: TaskDefinition, validate: bool,
                    checkpoint_in: str | None) -> None:
    """Tell the clock what follows the final save: the previous segment's measured
    validation time (its validation/prompts.json), else an estimate from the step time."""
    if not validate:
        clock.after_save_seconds = 0.0
        return
    clock.after_save_seconds = None
    clock.samples_per_step = task.train_args.batch_size * task.train_args.gradient_accumulation_steps
    cfg = 2 if task.validation.guidance_scale > 1 else 1
    clock.unet_passes_after_save = task.validation.num_images * task.validation.num_inference_steps * cfg
    if checkpoint_in:
        parent = checkpoint_in.rstrip("/").rsplit("/", 1)[0]
        try:
            summary = json.loads(storage.read_bytes(storage.join(parent, "validation", "prompts.json")))
            clock.after_save_seconds = float(summary["seconds"])
        except (FileNotFoundError, KeyError, ValueError, LoraflowError):
            pass


def run_validation(task: TaskDefinition, base: BaseModel, dataset: Any, tr: Trainer,
                   output_dir: str) -> list[str]:
    from engine.infer.validation import scheduler_for_inference

    pipeline_cls = _pipeline_class(base)
    components: dict[str, Any] = {
        "vae": base.vae, "unet": base.unet,
        "scheduler": scheduler_for_inference(base.location, task.model.revision, tr.prediction_type),
        "text_encoder": base.text_encoders[0], "tokenizer": base.tokenizers[0],
    }
    if base.family.is_sdxl:
        components |= {"text_encoder_2": base.text_encoders[1], "tokenizer_2": base.tokenizers[1]}
    else:
        components |= {"safety_checker": None, "feature_extractor": None,
                       "requires_safety_checker": False}
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.monotonic()
    prompts = validation_prompts(task, dataset)
    images = render_validation(pipe, task, prompts, base.device, base.dtype)
    return write_validation(output_dir, task, prompts, images, tr.global_step,
                            seconds=time.monotonic() - t0)


__all__ = ["LoraflowError", "SegmentOptions", "SegmentResult", "run_segment"]
