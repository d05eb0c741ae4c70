"""Where a segment starts: the checkpoint it resumes from, or its own committed result.

Three questions, asked before any training: was this very segment already committed
(:func:`already_committed`: then return it, idempotence); which checkpoint does it resume
from (:func:`load_resume_point`: the given one, verified and of this task, or the newest
good one kept beside it when it is damaged); did a killed attempt of this segment leave
an in-segment checkpoint to continue from (:func:`newest_intermediate`). Then
:func:`restore` puts a checkpoint into the trainer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from engine.errors import LoraflowError
from engine.infer.validation import VALIDATION_DIR
from engine.lora.weights import LORA_FILE, restore_lora
from engine.store import storage
from engine.store.commit import (
    CheckpointError,
    LoadedCheckpoint,
    is_finished,
    list_committed,
    read_checkpoint,
    write_finish_marker,
)
from engine.train.clock import SegmentClock
from engine.train.ema import restore_ema
from engine.train.full_finetune import WEIGHTS_FILE, restore_weights
from engine.train.new_token_state import restore_new_tokens
from engine.train.options import SegmentResult, StopReason
from engine.train.plan import TrainingPlan
from engine.train.saver import FINAL_DIR, INTERMEDIATE_DIR, segment_dir_of
from engine.train.state import (
    OPTIMIZER_FILE,
    STATE_FILE,
    StateMismatchError,
    fingerprint,
    identity_differences,
    restore_optimizer,
    restore_scheduler,
)
from engine.train.trainer import Trainer

log = logging.getLogger(__name__)


def checkpoint_state(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """The checkpoint's training_state.json; missing or not JSON is a CheckpointError."""
    try:
        state = json.loads(loaded.files[STATE_FILE])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint at {loaded.url} has no readable {STATE_FILE}: {exc}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint at {loaded.url}: {STATE_FILE} is not an object")
    return state


def already_committed(output_dir: str, identity: dict[str, Any], start_step: int,
                      plan: TrainingPlan, clock: SegmentClock) -> SegmentResult | None:
    """The result of this very segment if an earlier attempt already committed it.

    Running a segment again with the same task and input checkpoint finds its committed
    output and returns it (a retried Prefect task, a re-sent network task): idempotence.
    """
    url = storage.join(output_dir, FINAL_DIR)
    try:
        loaded = read_checkpoint(url)
    except CheckpointError:
        return None
    state = checkpoint_state(loaded)
    if (state.get("task_fingerprint") != fingerprint(identity)
            or state.get("started_from_step") != start_step):
        return None
    if loaded.finished and not is_finished(url):  # killed between manifest and marker
        write_finish_marker(url)
    log.info("segment already committed at %s (step %d); nothing to do", url, loaded.global_step)
    validation_dir = storage.join(output_dir, VALIDATION_DIR)
    images = [storage.join(validation_dir, name) for name in storage.list_files(validation_dir)
              if name.endswith(".png")]
    metrics = storage.join(output_dir, "metrics", "metrics.jsonl")
    return SegmentResult(
        steps_done=loaded.global_step - start_step, start_step=start_step,
        global_step=loaded.global_step, total_steps=plan.total_steps, finished=loaded.finished,
        stopped_by=StopReason.ALREADY_DONE, seconds=round(clock.elapsed(), 3), checkpoint=url,
        validation=images, metrics=metrics if storage.exists(metrics) else None,
    )


def load_resume_point(url: str, identity: dict[str, Any]) -> LoadedCheckpoint:
    """Read and verify the previous checkpoint; refuse one from a different task.

    A damaged checkpoint (missing or edited manifest, flipped byte, truncated file) is
    replaced by the newest good in-segment checkpoint kept beside it, if any: training
    then redoes the lost steps and, being deterministic, reaches the same result.
    """
    try:
        loaded = read_checkpoint(url)
    except CheckpointError as exc:
        fallback = fallback_for(url, identity)
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


def fallback_for(url: str, identity: dict[str, Any]) -> LoadedCheckpoint | None:
    """The newest good in-segment checkpoint of this training beside a damaged ``url``."""
    root = storage.join(segment_dir_of(url), INTERMEDIATE_DIR)
    for candidate in reversed(list_committed(root)):
        loaded = _matching(candidate, identity)
        if loaded is not None:
            return loaded
    return None


def newest_intermediate(output_dir: str, identity: dict[str, Any],
                        segment_start: int) -> LoadedCheckpoint | None:
    """This segment's own newest in-segment checkpoint, left by an attempt that was killed."""
    root = storage.join(output_dir, INTERMEDIATE_DIR)
    for url in reversed(list_committed(root)):
        loaded = _matching(url, identity)
        if loaded and checkpoint_state(loaded).get("started_from_step") == segment_start:
            return loaded
    return None


def _matching(url: str, identity: dict[str, Any]) -> LoadedCheckpoint | None:
    """The verified checkpoint at ``url`` if it belongs to this training, else None."""
    try:
        loaded = read_checkpoint(url)
    except CheckpointError as exc:
        log.warning("skipping checkpoint %s: %s", url, exc)
        return None
    state = checkpoint_state(loaded)
    return loaded if state.get("task_fingerprint") == fingerprint(identity) else None


def restore(tr: Trainer, loaded: LoadedCheckpoint) -> dict[str, Any]:
    """Put the checkpoint's state into the trainer and return its training_state.json.

    The manifest proves the files are the ones written, not that the writer was honest:
    a file that is not valid safetensors/JSON is refused (never unpickled), not a crash;
    every such refusal is a CheckpointError.
    """
    try:
        state = checkpoint_state(loaded)
        if tr.full:  # every trained weight, by name (engine/train/full_finetune.py)
            restore_weights(loaded.files[WEIGHTS_FILE], tr.params)
            restore_ema(tr.ema, tr.params, loaded.files,
                        lambda data: restore_weights(data, tr.params))
        else:
            restore_lora(loaded.files[LORA_FILE], tr.adapted)
            restore_ema(tr.ema, tr.params, loaded.files,
                        lambda data: restore_lora(data, tr.adapted))
        restore_optimizer(tr.optimizer, list(tr.params), loaded.files[OPTIMIZER_FILE],
                          state["optimizer"])
        restore_scheduler(tr.lr_scheduler, state["lr_scheduler"])
        restore_new_tokens(tr.params, tr.ema, loaded.files)  # after the EMA's restore
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
