"""The step's batch stream: batches made ahead from the cache are the batches made one at a
time, an encoder never runs ahead, and a stream closed unread leaves no worker."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from engine.data.prepared import load_dataset_for_task, model_identity
from engine.model.loading import load_base_model, training_device
from engine.train.cache import ensure_cache
from engine.train.plan import TrainingPlan
from engine.train.samples import Batch, SampleSource
from engine.train.stream import AHEAD, batch_stream, micro_batch_stream
from tests.support.engine import make_task

# 24 images, 5 per micro-batch, 2 a step: micro-batches of 5, 5 | 5, 5 | 4 | 5, 5 | 5, 5
TASK = make_task(**{"train_args.num_train_steps": 5, "train_args.max_train_steps": 5})


class CountingSource(SampleSource):
    """The real source, counting the micro-batches it has stacked."""

    made = 0

    def batch(self, samples):  # type: ignore[no-untyped-def]
        self.made += 1
        return super().batch(samples)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory):
    dataset = load_dataset_for_task(TASK, None)
    base = load_base_model(TASK, training_device())
    root = tmp_path_factory.mktemp("cache")
    cache = ensure_cache(TASK, base, dataset, str(root), model_identity(base))
    return dataset, base, cache, TrainingPlan.for_task(TASK, dataset)


def _tensors(batch: Batch) -> list[torch.Tensor]:
    return [batch.latents, batch.noise, batch.timesteps, *batch.conditioning.values()]


def test_batches_made_ahead_from_the_cache_equal_batches_made_one_at_a_time(parts) -> None:
    dataset, base, cache, plan = parts
    source = SampleSource(TASK, dataset, base, cache)
    assert not source.needs_encoders
    stream = batch_stream(source, plan, 1, 5, workers=0)  # from step 1, as after a resume
    got = list(stream)
    one_at_a_time = [source.batch(source.prepare(refs))
                     for step in range(1, 5) for refs in plan.micro_batches(step)]
    assert len(got) == len(one_at_a_time) == 7
    for made_ahead, alone in zip(got, one_at_a_time, strict=True):
        for a, b in zip(_tensors(made_ahead), _tensors(alone), strict=True):
            assert torch.equal(a, b)


def test_from_the_cache_the_stream_makes_four_ahead_and_with_an_encoder_none(parts) -> None:
    dataset, base, cache, plan = parts
    cached = CountingSource(TASK, dataset, base, cache)
    stream = batch_stream(cached, plan, 0, 5, workers=0)
    next(stream)
    assert cached.made == AHEAD == 4
    for _ in range(AHEAD):
        next(stream)
    assert cached.made == 2 * AHEAD
    stream.close()

    live = CountingSource(TASK, dataset, base, None)  # no cache: the VAE runs in batch()
    assert live.needs_encoders
    stream = batch_stream(live, plan, 0, 5, workers=0)
    next(stream)
    next(stream)
    assert live.made == 2
    stream.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="data-loader workers need fork here")
def test_a_worker_stream_closed_unread_starts_no_worker(parts) -> None:
    dataset, base, cache, plan = parts
    source = SampleSource(TASK, dataset, base, cache)
    before = set(multiprocessing.active_children())
    stream = micro_batch_stream(source, plan, 0, 5, workers=2)
    stream.close()
    assert set(multiprocessing.active_children()) == before


def test_a_stream_stopped_mid_burst_resumes_with_the_same_batches(parts) -> None:
    dataset, base, cache, plan = parts
    source = SampleSource(TASK, dataset, base, cache)
    whole = list(batch_stream(source, plan, 0, 5, workers=0))
    first = batch_stream(source, plan, 0, 5, workers=0)
    taken = [next(first) for _ in range(5)]  # steps 0-2: one micro-batch into the 2nd burst
    first.close()
    rest = list(batch_stream(source, plan, 3, 5, workers=0))
    for a, b in zip(taken + rest, whole, strict=True):
        for x, y in zip(_tensors(a), _tensors(b), strict=True):
            assert torch.equal(x, y)
