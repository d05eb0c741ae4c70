"""The digest trail: what a segment commits to along the way, so part of it can be replayed.

Every few optimizer steps (``train_args.digest_steps``, else about
:data:`POINTS_PER_SEGMENT` per segment), at the segment's first step, at every in-segment
checkpoint and at its last step, the trainer's state is reduced to a :class:`TrailPoint`:
the step's loss as an exact float (``float.hex``), a sha256 of the trained weights and one
of the optimizer state (moments, step counts, group settings, the schedule's position),
and of the EMA when there is one. Each checkpoint's manifest carries its segment's trail
so far (:data:`TRAIL_KEY`), so a verifier (:mod:`engine.train.verify`) can replay a window
from a state it holds and compare, bit for bit, what it gets with what was committed.

Only the manifest holds it: no checkpoint file and no training result changes, so a task
trains to the very same bytes with or without anyone verifying it. A trail read back is
outside input: :meth:`DigestTrail.from_meta` refuses a malformed one with a
:class:`TrailError` that says what is wrong, never a traceback.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import LoraflowError

#: The manifest key that holds a checkpoint's trail.
TRAIL_KEY = "digest_trail"
TRAIL_FORMAT = "loraflow-digests/1"
#: Points per segment when ``digest_steps`` is not set: hashing costs about as much as
#: reading the weights once, so a few per segment are free next to the steps.
POINTS_PER_SEGMENT = 16
_HEX64 = frozenset("0123456789abcdef")


class TrailError(LoraflowError):
    """A checkpoint's digest trail is missing or malformed (it cannot be verified)."""


def digest_every(digest_steps: int | None, planned_steps: int) -> int:
    """How often a point is recorded: the task's ``digest_steps``, else a planned segment
    of ``planned_steps`` gets about :data:`POINTS_PER_SEGMENT` points."""
    if digest_steps:
        return digest_steps
    return max(1, planned_steps // POINTS_PER_SEGMENT)


# -- hashing the state -----------------------------------------------------------------


def _update_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Name, dtype, shape and raw bytes: two states hash alike only if they are equal bit
    for bit (a 1-ulp change, a reshape or a dtype change all move the hash)."""
    t = tensor.detach()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    raw = t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    digest.update(memoryview(raw))


def _scalar_text(value: Any) -> str:
    """A number's exact text: floats by their hex form (repr would round nothing either,
    but hex says so), everything else by its type and repr."""
    if isinstance(value, float):
        return f"float:{value.hex()}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_scalar_text(v) for v in value) + "]"
    return f"{type(value).__name__}:{value!r}"


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over named tensors, in the order given (callers give a stable one)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        _update_tensor(digest, name, tensor)
    return digest.hexdigest()


def weights_digest(params: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the trained weights, by name in sorted order."""
    return tensors_digest((name, params[name]) for name in sorted(params))


def optimizer_digest(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor],
                     scheduler: Any) -> str:
    """sha256 of everything the next step reads besides the weights: each weight's
    optimizer state (by the weight's name), the param groups' settings (lr, betas,
    Prodigy's estimate, ...) and the schedule's position."""
    digest = hashlib.sha256()
    by_id = {id(p): name for name, p in params.items()}
    for name in sorted(params):
        state = optimizer.state.get(params[name], {})
        for key in sorted(state):
            value = state[key]
            if isinstance(value, torch.Tensor):
                _update_tensor(digest, f"{name}::{key}", value)
            else:
                digest.update(f"{name}::{key}={_scalar_text(value)}|".encode())
    for index, group in enumerate(optimizer.param_groups):
        names = ",".join(by_id.get(id(p), "?") for p in group["params"])
        digest.update(f"group{index}:{names}|".encode())
        for key in sorted(k for k in group if k != "params"):
            value = group[key]
            if isinstance(value, torch.Tensor):
                _update_tensor(digest, f"group{index}::{key}", value)
            else:
                digest.update(f"group{index}::{key}={_scalar_text(value)}|".encode())
    digest.update(f"schedule:{_scalar_text(getattr(scheduler, 'last_epoch', None))}".encode())
    return digest.hexdigest()


# -- the trail -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrailPoint:
    """The state after ``step`` optimizer steps of the whole training, as hashes."""

    step: int
    loss: str | None  # float.hex of that step's loss; None at a segment's first point
    weights: str
    optimizer: str
    ema: str | None = None  # sha256 of the average, when train_args.ema keeps one

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "loss": self.loss, "weights": self.weights,
                               "optimizer": self.optimizer}
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    def differences(self, other: TrailPoint) -> list[str]:
        """What differs from ``other`` (the same step): 'loss', 'weights', ..."""
        fields = ("loss", "weights", "optimizer", "ema")
        return [f for f in fields if getattr(self, f) != getattr(other, f)]


def state_point(tr: Any, loss: float | None) -> TrailPoint:
    """The trainer ``tr``'s state now (after ``tr.global_step`` steps) as a point."""
    ema = getattr(tr, "ema", None)
    return TrailPoint(
        step=tr.global_step,
        loss=None if loss is None else float(loss).hex(),
        weights=weights_digest(tr.params),
        optimizer=optimizer_digest(tr.optimizer, tr.params, tr.lr_scheduler),
        ema=weights_digest(ema.shadow) if ema is not None else None,
    )


@dataclass
class DigestTrail:
    """One segment's points, from its first step (``start``) on."""

    every: int
    start: int
    points: list[TrailPoint] = field(default_factory=list)
    _last_loss: tuple[int, float] | None = field(default=None, repr=False)

    @classmethod
    def begin(cls, tr: Any, every: int) -> DigestTrail:
        """A trail for a segment starting at ``tr``'s state (its first point, no loss)."""
        return cls(every=every, start=tr.global_step, points=[state_point(tr, None)])

    @property
    def end(self) -> int:
        return self.points[-1].step

    def point_at(self, step: int) -> TrailPoint | None:
        return next((p for p in self.points if p.step == step), None)

    def record(self, tr: Any, loss: float, *, forced: bool = False) -> None:
        """After a step: a point if one is due (or ``forced``: a checkpoint follows)."""
        self._last_loss = (tr.global_step, loss)
        if forced or tr.global_step % self.every == 0:
            self._append(state_point(tr, loss))

    def close(self, tr: Any) -> None:
        """Before the final save: the last step gets a point too."""
        if self.end != tr.global_step:
            last = self._last_loss
            self._append(state_point(tr, last[1] if last and last[0] == tr.global_step
                                     else None))

    def _append(self, point: TrailPoint) -> None:
        if point.step > self.end:
            self.points.append(point)

    def up_to(self, step: int) -> DigestTrail:
        """The trail as it stood at ``step`` (resuming from an in-segment checkpoint)."""
        return DigestTrail(self.every, self.start, [p for p in self.points if p.step <= step])

    def meta(self) -> dict[str, Any]:
        """What the manifest holds under :data:`TRAIL_KEY`."""
        return {TRAIL_KEY: {"format": TRAIL_FORMAT, "every": self.every, "start": self.start,
                            "end": self.end, "points": [p.to_json() for p in self.points]}}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], where: str) -> DigestTrail:
        """The trail of a manifest's meta, checked field by field; :class:`TrailError`
        names what is wrong and where (``where``: the checkpoint, for the message)."""
        doc = meta.get(TRAIL_KEY)
        if doc is None:
            raise TrailError(f"checkpoint at {where} has no digest trail ({TRAIL_KEY} in its "
                             "manifest): it was written before verification existed, or "
                             "the trail was removed; it cannot be verified")

        def bad(why: str) -> TrailError:
            return TrailError(f"checkpoint at {where} has a malformed digest trail: {why}")

        if not isinstance(doc, dict) or doc.get("format") != TRAIL_FORMAT:
            raise bad(f"format is not {TRAIL_FORMAT!r}")
        every, start, end = doc.get("every"), doc.get("start"), doc.get("end")
        if not _is_int(every) or every < 1 or not _is_int(start) or start < 0:
            raise bad("'every' must be an integer >= 1 and 'start' one >= 0")
        raw = doc.get("points")
        if not isinstance(raw, list) or not raw:
            raise bad("'points' must be a non-empty list")
        points = [_point(p, i, bad) for i, p in enumerate(raw)]
        steps = [p.step for p in points]
        if steps[0] != start or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise bad(f"the points' steps {steps[:5]}... must start at 'start' ({start}) "
                      "and increase")
        if end != steps[-1]:
            raise bad(f"'end' ({end!r}) is not the last point's step ({steps[-1]})")
        return cls(every=every, start=start, points=points)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def _point(raw: Any, index: int, bad: Any) -> TrailPoint:
    where = f"points[{index}]"
    if not isinstance(raw, dict):
        raise bad(f"{where} is not an object")
    step, loss = raw.get("step"), raw.get("loss")
    if not _is_int(step) or step < 0:
        raise bad(f"{where}.step must be an integer >= 0")
    if loss is not None:
        try:
            ok = isinstance(loss, str) and math.isfinite(float.fromhex(loss))
        except ValueError:
            ok = False
        if not ok:
            raise bad(f"{where}.loss must be a float in hex form (float.hex) or null")
    for key in ("weights", "optimizer"):
        if not _is_digest(raw.get(key)):
            raise bad(f"{where}.{key} must be a sha256 (64 lowercase hex digits)")
    ema = raw.get("ema")
    if ema is not None and not _is_digest(ema):
        raise bad(f"{where}.ema must be a sha256 or absent")
    return TrailPoint(step=step, loss=loss, weights=raw["weights"],
                      optimizer=raw["optimizer"], ema=ema)


def segment_trail(task: Any, tr: Any, resumed_from: Any, segment_start: int,
                  segment_end: int) -> DigestTrail:
    """The trail a segment continues: the one of its own in-segment checkpoint when a
    killed attempt left one (``resumed_from`` past ``segment_start``), else a new one that
    begins with the state ``tr`` holds now."""
    every = digest_every(task.train_args.digest_steps, segment_end - segment_start)
    if resumed_from is not None and resumed_from.global_step > segment_start:
        try:
            saved = DigestTrail.from_meta(resumed_from.manifest.meta, resumed_from.url)
        except TrailError:
            saved = None  # an older checkpoint: this attempt's trail cannot be complete
        if saved is not None and saved.start == segment_start:
            return saved.up_to(resumed_from.global_step)
    return DigestTrail.begin(tr, every)
