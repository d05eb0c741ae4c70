"""The segment's data stream: its micro-batches, prepared in order, maybe by workers.

Item k of the stream is the k-th micro-batch of the segment (steps ``start`` to ``end``
as :class:`~engine.train.plan.TrainingPlan` lays them out), turned into CPU tensors by
:meth:`SampleSource.prepare`. With ``dataloader_num_workers`` > 0 a torch DataLoader
prepares ahead in worker processes; the order, and so every bit, is the same.

Without workers the micro-batches are laid out as they are read, a step at a time (at
most :data:`AHEAD` micro-batches before the step reaches them), so the epochs they need
are still in the plan's cache of four when :func:`engine.train.trainer.train_step` asks for
them to count its samples: an epoch's shuffle is computed once, not again from a list made
for the whole segment up front (which evicted it from that cache on short epochs, ~20 µs
a step, and held every ref of a long segment in memory).

A worker hands its samples over as numpy arrays, not tensors (:func:`_to_wire`): torch
sends each tensor through its own shared-memory segment with a socket round trip, ~40 per
micro-batch here, which cost more than preparing the batch (measured by
``engine/bench/data_path.py``: 2 workers were slower than none from the cache). Arrays
travel inline in one message and come back as the same bits.

What the step takes is :func:`batch_stream`: each micro-batch made a
:class:`~engine.train.samples.Batch` on the training device. When every input comes from
the cache (nothing to encode), it makes :data:`AHEAD` micro-batches at once, laying out,
preparing and stacking them back to back. Why: on a CPU that work runs right after the
UNet's backward, which leaves the CPU's caches cold for the step's own code, and a run of
it pays for that once instead of per micro-batch (tiny-sd1, batch 8, from the cache, timed
right after a UNet pass: 1.31 ms per micro-batch one at a time, 0.70 four at a time, 0.66
eight at a time; some of it comes back as colder caches in the step's next phase: see
docs/performance.md for what the bench's step gained).
A batch is a pure function of its samples, so the bits are the same made early or late;
a stop wastes at most three micro-batches' stacking. With an encoder to run (the cache
lacks something, or a text encoder trains) batches are made one at a time, when reached,
as before: an encode made ahead would be time the time box cannot see coming.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from engine.train.distributed import SINGLE, World, share
from engine.train.plan import TrainingPlan
from engine.train.samples import Batch, PreparedSample, SampleSource

log = logging.getLogger(__name__)

#: Micro-batches made ready together when nothing needs an encoder (see the docstring):
#: four took most of the gain (eight: 0.04 ms more per micro-batch) and keep on the device
#: at most four micro-batches' latents, noise and text embeddings beside the step's own.
AHEAD = 4


class _MicroBatches(torch.utils.data.Dataset):
    """Item k = the prepared samples of the k-th micro-batch of this segment (this rank's
    share of them when several processes train it)."""

    def __init__(self, source: SampleSource, plan: TrainingPlan, start: int, end: int,
                 world: World = SINGLE) -> None:
        self.source = source
        self.refs = [share(mb, world) for step in range(start, end)
                     for mb in plan.micro_batches(step)]

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, k: int) -> list[PreparedSample]:
        samples = self.source.prepare(self.refs[k])
        if torch.utils.data.get_worker_info() is not None:  # in a worker: send arrays
            return [_to_wire(s) for s in samples]
        return samples


def micro_batch_stream(source: SampleSource, plan: TrainingPlan, start: int, end: int,
                       workers: int, world: World = SINGLE) -> Iterator[list[PreparedSample]]:
    """Prepared micro-batches in order; ``workers`` data-loader processes prepare ahead.

    With several processes (``world``) each reads only its share of every micro-batch
    (:func:`engine.train.distributed.share`), possibly none of a small one.

    Close the stream (``.close()``) when training stops: it stops the workers.
    """
    if workers == 0:
        return _in_process(source, plan, start, end, world)  # a generator: has close()
    dataset = _MicroBatches(source, plan, start, end, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_as_is, persistent_workers=False,
    )
    return _closing(loader)


def batch_stream(source: SampleSource, plan: TrainingPlan, start: int, end: int,
                 workers: int, world: World = SINGLE) -> Iterator[Batch | None]:
    """The segment's micro-batches ready for the step, in order: each a Batch on the
    training device, or None where this rank's share of it is empty (several processes).

    Prepared by :func:`micro_batch_stream` (``workers`` processes or here), stacked here;
    :data:`AHEAD` at a time when :attr:`SampleSource.needs_encoders` is false. Close it
    when training stops.
    """
    return ready_batches(micro_batch_stream(source, plan, start, end, workers, world), source)


def ready_batches(prepared: Iterator[list[PreparedSample]],
                  source: SampleSource) -> Iterator[Batch | None]:
    """``prepared`` micro-batches made Batches by ``source``, :data:`AHEAD` at a time when
    it needs no encoder, else each when reached; closing it closes ``prepared``."""
    ahead = 1 if source.needs_encoders else AHEAD
    try:
        while chunk := list(itertools.islice(prepared, ahead)):
            batches = [source.batch(samples) if samples else None for samples in chunk]
            yield from batches
    finally:
        close = getattr(prepared, "close", None)  # a generator's; a plain iterator has none
        if close is not None:
            close()


def _in_process(source: SampleSource, plan: TrainingPlan, start: int, end: int,
                world: World) -> Iterator[list[PreparedSample]]:
    """The stream's micro-batches prepared here, each step's laid out when it is reached."""
    for step in range(start, end):
        for micro_batch in plan.micro_batches(step):
            yield source.prepare(share(micro_batch, world))


def _as_is(item: Any) -> Any:
    return item


def _closing(loader: Any) -> Iterator[list[PreparedSample]]:
    """Yield from a worker-backed loader and stop its workers when training stops.

    A segment usually stops before the loader is exhausted (budget, signal); left to the
    garbage collector, the worker processes are torn down mid-prefetch and torch reports
    them as crashed. The workers start when the stream is first read, so a stream closed
    unread (a generator's ``finally`` never runs then) leaves none behind.
    """
    loader_iter = iter(loader)
    try:
        for samples in loader_iter:
            yield [_from_wire(s) for s in samples]
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


# -- handing samples over from workers ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Array:
    """A tensor as a numpy array (bfloat16, which numpy lacks, as its int16 bits)."""

    dtype: torch.dtype
    data: np.ndarray


def _pack(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return _Array(t.dtype, bits.numpy())
    if isinstance(value, tuple):
        return tuple(_pack(v) for v in value)
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, _Array):
        t = torch.from_numpy(value.data)
        return t.view(torch.bfloat16) if value.dtype == torch.bfloat16 else t
    if isinstance(value, tuple):
        return tuple(_unpack(v) for v in value)
    if isinstance(value, dict):
        return {k: _unpack(v) for k, v in value.items()}
    return value


def _to_wire(sample: PreparedSample) -> PreparedSample:
    fields = {f.name: _pack(getattr(sample, f.name)) for f in dataclasses.fields(sample)}
    return dataclasses.replace(sample, **fields)


def _from_wire(sample: PreparedSample) -> PreparedSample:
    fields = {f.name: _unpack(getattr(sample, f.name)) for f in dataclasses.fields(sample)}
    return dataclasses.replace(sample, **fields)
