"""Verifying a segment: replay part of it and compare with the digest trail it committed.

A segment turned checkpoint A into checkpoint B and left, in B's manifest, its digest
trail (:mod:`engine.train.digests`): the loss and state hashes at points along the way.
:func:`verify_segment` checks, in order:

1. A and B are checkpoints of this task (their manifests verify, their identities are
   the task's), B's trail starts at A's step and ends at B's;
2. every state the verifier replays from (A, or an in-segment checkpoint left in B's
   segment folder) hashes to the trail's point at its step;
3. each chosen window (:mod:`engine.train.verify_windows`: always the last, and random
   others up to ``sample`` of the segment) replayed step by step gives, at every trail
   point, the very loss and hashes of the trail;
4. B itself hashes to the trail's last point.

Training is bit-exact on one device type with one thread count, so an honest segment
matches everywhere, and any other work differs at the first point after it. The verdict
says which step and what differed. What the trail proves, and what a cheater would have
to do to pass, is in ``docs/verify.md``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from engine.store import storage
from engine.store.commit import LoadedCheckpoint, list_committed, read_checkpoint
from engine.task.definition import TaskDefinition
from engine.train.digests import DigestTrail, TrailError, TrailPoint, state_point
from engine.train.resume import checkpoint_state
from engine.train.saver import INTERMEDIATE_DIR, segment_dir_of
from engine.train.state import StateMismatchError, fingerprint, identity_differences
from engine.train.verify_windows import Window, pick_windows

log = logging.getLogger(__name__)

#: The share of a segment replayed when none is asked for.
DEFAULT_SAMPLE = 0.25


@dataclass
class Verdict:
    """What a verification found: pass, or the first step whose digest differed."""

    start: int  # the segment's first and last global steps
    end: int
    seed: int  # the sampling seed: the same seed replays the same windows
    windows: list[Window] = field(default_factory=list)
    replayed_steps: int = 0
    mismatch: str | None = None  # None: every compared point matched

    @property
    def passed(self) -> bool:
        return self.mismatch is None

    @property
    def cost(self) -> float:
        """Steps replayed per step of the segment."""
        return self.replayed_steps / max(1, self.end - self.start)

    def lines(self) -> list[str]:
        spans = ", ".join(f"{w.start}-{w.end}" for w in self.windows) or "none"
        head = ("PASS" if self.passed else f"FAIL: {self.mismatch}")
        return [head,
                f"segment steps {self.start}-{self.end} ({self.end - self.start} steps); "
                f"replayed {self.replayed_steps} in windows {spans} (cost {self.cost:.3f} of "
                f"the segment); sampling seed {self.seed}"]


class _Mismatch(Exception):
    """Internal: the first differing point, carried out of the replay."""


def verify_segment(task: TaskDefinition, checkpoint_in: str | None, checkpoint_out: str, *,
                   sample: float = DEFAULT_SAMPLE, seed: int | None = None,
                   data_root: str | None = None, cache_root: str | None = None) -> Verdict:
    """Replay part of the segment that turned ``checkpoint_in`` (None: the first segment,
    from the task's initial weights) into ``checkpoint_out``; see the module docstring."""
    from engine.data.prepared import load_dataset_for_task
    from engine.train.plan import TrainingPlan
    from engine.train.state import training_identity

    seed = secrets.randbits(62) if seed is None else seed
    dataset = load_dataset_for_task(task, data_root)
    plan = TrainingPlan.for_task(task, dataset)
    identity = training_identity(task, dataset.content_hash, dataset.subset_hashes)
    given = _of_task(checkpoint_in, identity) if checkpoint_in else None
    result = _of_task(checkpoint_out, identity)
    start = given.global_step if given else 0
    trail = DigestTrail.from_meta(result.manifest.meta, storage.redact(result.url))
    _check_span(trail, result, start)
    held = _held_states(result, identity, start, trail)
    states: dict[int, LoadedCheckpoint | None] = {start: given, **held}
    windows = pick_windows(list(states), result.global_step, sample, seed)
    verdict = Verdict(start=start, end=result.global_step, seed=seed, windows=windows)
    try:
        _replay(task, dataset, plan, cache_root, states, windows, trail, result, verdict)
    except _Mismatch as found:
        verdict.mismatch = str(found)
    log.info("verification: %s", " | ".join(verdict.lines()))
    return verdict


def _of_task(url: str, identity: dict[str, Any]) -> LoadedCheckpoint:
    """The verified checkpoint at ``url``; refused when it belongs to another task."""
    loaded = read_checkpoint(url)
    differences = identity_differences(checkpoint_state(loaded).get("identity", {}), identity)
    if differences:
        raise StateMismatchError(
            f"checkpoint {storage.redact(url)} belongs to a different task; it differs in:\n  "
            + "\n  ".join(differences[:10]))
    return loaded


def _check_span(trail: DigestTrail, result: LoadedCheckpoint, start: int) -> None:
    where = storage.redact(result.url)
    started = checkpoint_state(result).get("started_from_step")
    if started != start or trail.start != start:
        raise TrailError(f"checkpoint at {where} is not the segment that follows the input "
                         f"checkpoint: it started from step {started!r} (its trail from "
                         f"{trail.start}), the input is at step {start}")
    if trail.end != result.global_step:
        raise TrailError(f"checkpoint at {where} is at step {result.global_step} but its "
                         f"trail ends at step {trail.end}")


def _held_states(result: LoadedCheckpoint, identity: dict[str, Any], start: int,
                 trail: DigestTrail) -> dict[int, LoadedCheckpoint]:
    """The segment's in-segment checkpoints (verified, of this task and segment) by step.

    One of another task or segment is not a state of this segment and is passed over; one
    of this segment at a step its trail does not name contradicts the trail."""
    root = storage.join(segment_dir_of(result.url), INTERMEDIATE_DIR)
    held: dict[int, LoadedCheckpoint] = {}
    for url in list_committed(root):
        loaded = read_checkpoint(url)
        state = checkpoint_state(loaded)
        if (loaded.task_fingerprint != fingerprint(identity)
                or state.get("started_from_step") != start
                or not start < loaded.global_step < result.global_step):
            continue
        if trail.point_at(loaded.global_step) is None:
            raise TrailError(f"in-segment checkpoint at {storage.redact(url)} (step "
                             f"{loaded.global_step}) has no point in the segment's trail")
        held[loaded.global_step] = loaded
    return held


def _replay(task: TaskDefinition, dataset: Any, plan: Any, cache_root: str | None,
            states: dict[int, LoadedCheckpoint | None], windows: list[Window],
            trail: DigestTrail, result: LoadedCheckpoint, verdict: Verdict) -> None:
    """Build the model once; replay each window from its state; last, check B itself."""
    from engine.data.prepared import model_identity
    from engine.model.loading import load_base_model, training_device
    from engine.train.cache import ensure_cache
    from engine.train.determinism import apply_kernel_mode
    from engine.train.resume import restore
    from engine.train.samples import SampleSource
    from engine.train.trainer import build_trainer

    device = training_device()
    apply_kernel_mode(task.train_args.deterministic, device)
    base = load_base_model(task, device)
    tr = build_trainer(task, base, plan)  # at step 0: the first segment's starting state
    cache = None
    if cache_root:
        cache = ensure_cache(task, base, dataset, cache_root, model_identity(base),
                             progress=None)
    source = SampleSource(task, dataset, base, cache)
    for window in windows:  # in step order: a window from step 0 uses the fresh trainer
        state = states[window.start]
        if state is not None:
            restore(tr, state)
        what = "the input checkpoint" if window.start == verdict.start else (
            f"the in-segment checkpoint at step {window.start}")
        _compare(state_point(tr, None), trail, what, loss=False)
        _replay_window(tr, source, window, trail, verdict)
    restore(tr, result)
    _compare(state_point(tr, None), trail, "the output checkpoint", loss=False)


def _replay_window(tr: Any, source: Any, window: Window, trail: DigestTrail,
                   verdict: Verdict) -> None:
    from engine.train.stream import batch_stream
    from engine.train.trainer import train_step

    batches = batch_stream(source, tr.plan, window.start, window.end, 0)
    try:
        while tr.global_step < window.end:
            loss = train_step(tr, batches)["loss"]
            verdict.replayed_steps += 1
            if trail.point_at(tr.global_step) is not None:
                _compare(state_point(tr, loss), trail,
                         f"the replay from step {window.start}", loss=True)
    finally:
        batches.close()


def _compare(got: TrailPoint, trail: DigestTrail, what: str, *, loss: bool) -> None:
    want = trail.point_at(got.step)
    if want is None:
        raise _Mismatch(f"step {got.step}: the trail has no point for {what}")
    differs = [d for d in got.differences(want) if loss or d != "loss"]
    if differs:
        raise _Mismatch(f"step {got.step}: {' and '.join(differs)} of {what} differ from the "
                        "segment's digest trail")
