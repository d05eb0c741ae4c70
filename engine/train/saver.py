"""Saving a segment: the files of a checkpoint, and when and where they are committed.

A segment's folder (``output_dir``) holds its result in ``checkpoint/`` (the layout
Crynux nodes expect) and, when ``checkpointing_steps`` is set, in-segment checkpoints in
``checkpoints/step-NNNNNNNN`` that a killed attempt resumes from. Every checkpoint is
committed through :func:`engine.store.commit.commit_checkpoint`: it exists only once
its manifest is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from engine.infer.pipeline import pipeline_class
from engine.lora.weights import LORA_FILE, lora_file_bytes
from engine.store import storage
from engine.store.commit import commit_checkpoint, list_committed, remove_checkpoint
from engine.train.clock import SegmentClock
from engine.train.determinism import runtime_record
from engine.train.digests import DigestTrail
from engine.train.distributed import SINGLE, World, check_ranks_agree, committed, world_meta
from engine.train.ema import ema_files
from engine.train.full_finetune import WEIGHTS_FILE, weights_file_bytes
from engine.train.new_token_state import new_token_files
from engine.train.state import (
    OPTIMIZER_FILE,
    STATE_FILE,
    fingerprint,
    optimizer_files,
    scheduler_state,
)
from engine.train.trainer import Trainer

log = logging.getLogger(__name__)

FINAL_DIR = "checkpoint"  # output_dir/checkpoint: the segment's result
INTERMEDIATE_DIR = "checkpoints"  # output_dir/checkpoints/step-NNNNNNNN: in-segment ones

#: Bytes per element of what a checkpoint stores per LoRA weight: the fp32 weight and
#: AdamW's two fp32 moments (exp_avg, exp_avg_sq).
_CHECKPOINT_BYTES_PER_ELEMENT = 4 * 3


def estimated_checkpoint_bytes(params: Iterable[torch.Tensor]) -> int:
    """About how many bytes a checkpoint of ``params`` writes (the JSON state is noise).

    Only the time box uses it, to guess the first save's duration before one has been
    timed (:meth:`SegmentClock.save_estimate`); no file depends on it.
    """
    return sum(p.numel() * _CHECKPOINT_BYTES_PER_ELEMENT for p in params)


def segment_dir_of(checkpoint_url: str) -> str:
    """The segment folder a checkpoint was committed in (``.../checkpoint`` -> ``...``)."""
    return checkpoint_url.rstrip("/").rsplit("/", 1)[0]


def checkpoint_files(tr: Trainer, extra_state: dict[str, Any]) -> dict[str, bytes]:
    """The files of a checkpoint of ``tr``: LoRA weights, optimizer moments, JSON state."""
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
    def lora_bytes() -> bytes:
        if tr.full:  # every trained weight, by name (engine/train/full_finetune.py)
            return weights_file_bytes(tr.params)
        return lora_file_bytes(
            pipeline_class(tr.base.family), tr.base.unet,
            {k: v for k, v in tr.adapted.items() if k != "unet"},
        )

    return {
        WEIGHTS_FILE if tr.full else LORA_FILE: lora_bytes(),
        OPTIMIZER_FILE: moments,
        STATE_FILE: json.dumps(state, indent=2, sort_keys=True).encode(),
        **ema_files(tr.ema, tr.params, lora_bytes),  # the average, when train_args.ema
        **new_token_files(tr.params, tr.ema),  # lora.new_tokens' rows, when trained
    }


@dataclass
class CheckpointSaver:
    """Commits this segment's checkpoints: in-segment ones every N steps, and the last.

    The newest ``keep`` (``checkpoints_total_limit``) in-segment checkpoints are kept;
    older ones are deleted only after a newer one is committed.
    """

    output_dir: str
    identity: dict[str, Any]
    segment_start: int
    clock: SegmentClock
    every: int | None  # checkpointing_steps
    keep: int | None  # checkpoints_total_limit
    world: World = SINGLE  # several processes: only rank 0 writes (engine/train/distributed)
    trail: DigestTrail | None = None  # the digest trail each manifest carries (digests.py)

    def due(self, step: int, end: int) -> bool:
        """Whether an in-segment checkpoint is due after ``step`` (never at the end).

        At global multiples of ``every``, wherever the segment started (a budget ends
        segments anywhere): ``validation.validation_steps`` renders those checkpoints."""
        return bool(self.every) and step < end and step % self.every == 0

    def commit(self, tr: Trainer, url: str) -> str:
        t0 = time.monotonic()
        check_ranks_agree(self.world, tr.params, tr.global_step)  # several processes
        if self.world.writes:  # rank 0 writes; the other ranks wait for it below
            files = checkpoint_files(tr, {
                "identity": self.identity,
                "task_fingerprint": fingerprint(self.identity),
                "started_from_step": self.segment_start,
                "seconds_per_step": self.clock.seconds_per_step(),
            })
            commit_checkpoint(url, files, meta={
                "global_step": tr.global_step, "task_fingerprint": fingerprint(self.identity),
                "finished": tr.finished,
                "runtime": runtime_record(tr.base.device),  # threads etc.: a resume compares
                **world_meta(self.world),  # for information: not part of the identity
                **(self.trail.meta() if self.trail else {}),  # for loraflow verify
            })
        committed(self.world)
        seconds = time.monotonic() - t0
        self.clock.record_save(seconds)
        if self.world.writes:  # the other ranks only waited for it: rank 0 says so once
            log.info("committed %s at step %d (%.2f s)", url, tr.global_step, seconds)
        return url

    def save_intermediate(self, tr: Trainer) -> str:
        root = storage.join(self.output_dir, INTERMEDIATE_DIR)
        url = self.commit(tr, storage.join(root, f"step-{tr.global_step:08d}"))
        if self.keep and self.world.writes:
            for old in list_committed(root)[: -self.keep]:
                remove_checkpoint(old)  # uncommit first: a kill mid-delete leaves no torn one
        return url

    def record_step(self, tr: Trainer, loss: float, end: int) -> None:
        """After each step: the trail's point, if due (always before a checkpoint)."""
        if self.trail is not None:
            self.trail.record(tr, loss, forced=self.due(tr.global_step, end))

    def save_final(self, tr: Trainer) -> str:
        if self.trail is not None:
            self.trail.close(tr)
        return self.commit(tr, storage.join(self.output_dir, FINAL_DIR))
