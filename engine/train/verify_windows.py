"""Which parts of a segment a verifier replays: windows between states it holds.

A window runs from a state the verifier can load (the input checkpoint, or one of the
segment's in-segment checkpoints) to the next one, or to the segment's end. The last
window, which ends at the checkpoint the network pays for (and the next segment trains
from), is always replayed; the others are drawn at random, without replacement, until
the next one would pass ``sample`` x the segment's steps. The draw comes from
:func:`engine.train.seeding.generator` (purpose ``verify_windows``), so a verdict is
reproduced by its seed, and a worker that cannot guess the seed cannot guess the windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import LoraflowError
from engine.train.seeding import generator


class UnverifiableError(LoraflowError):
    """The segment holds no states close enough together to check it at this cost."""


@dataclass(frozen=True)
class Window:
    """Replay from the state at ``start`` (held by the verifier) up to ``end``."""

    start: int
    end: int

    @property
    def steps(self) -> int:
        return self.end - self.start


def windows_between(states: list[int], end: int) -> list[Window]:
    """The windows from each held state to the next (the last to ``end``)."""
    bounds = sorted(set(states)) + [end]
    return [Window(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def pick_windows(states: list[int], end: int, sample: float, seed: int) -> list[Window]:
    """The windows to replay, in step order: the last one, then random others within
    ``sample`` x (``end`` - first state) steps in all."""
    if not 0 < sample <= 1:
        raise ValueError(f"sample must be in (0, 1], got {sample}")
    windows = windows_between(states, end)
    if not windows:
        return []
    budget = sample * (end - min(states))
    last, others = windows[-1], windows[:-1]
    if last.steps > budget + 1e-9:
        raise UnverifiableError(
            f"the segment cannot be verified at --sample {sample:g}: its last "
            f"{last.steps} step(s) (from step {last.start} to {last.end}) have no state "
            f"between them to replay from, which is more than {budget:g} steps. Train it "
            f"with train_args.checkpointing_steps <= {max(1, int(budget))} (and keep those "
            "checkpoints), or verify with a larger --sample"
        )
    chosen, used = [last], last.steps
    for index in _permutation(len(others), seed):
        window = others[index]
        if used + window.steps <= budget + 1e-9:
            chosen.append(window)
            used += window.steps
    return sorted(chosen, key=lambda w: w.start)


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=generator(seed, "verify_windows")).tolist() if n else []
