"""The live path (cache off): every image and caption encoded each step, one sample at a
time, made cheap without moving a bit (engine/train/samples.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.data.prepared import load_dataset_for_task
from engine.model.loading import load_base_model, training_device
from engine.train.plan import TrainingPlan
from engine.train.samples import (
    SampleSource,
    draw_latent,
    encode_caption,
    encode_image,
)
from tests.support.engine import make_task

LIVE = {"train_args.cache": "off", "train_args.batch_size": 4,
        "train_args.gradient_accumulation_steps": 1}


@pytest.fixture(scope="module")
def live():
    task = make_task(**LIVE)
    data = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    return task, data, base, SampleSource(task, data, base, None), TrainingPlan.for_task(task, data)


def test_a_live_batch_is_each_sample_encoded_on_its_own(live) -> None:
    task, _, base, source, plan = live
    for step in range(3):
        (refs,) = plan.micro_batches(step)
        prepared = source.prepare(list(refs))
        batch = source.batch(prepared)
        for row, p in enumerate(prepared):
            mean, std = encode_image(base.vae, p.pixels)  # placement read on every call
            expected = draw_latent(mean, std, task.seed, p.ref) * base.vae_scaling_factor
            assert torch.equal(batch.latents[row], expected)
            text = encode_caption(base, p.decision.caption)
            assert torch.equal(batch.conditioning["prompt_embeds"][row], text["prompt_embeds"])


def test_a_caption_twice_in_a_batch_is_encoded_once_with_the_same_bits(live) -> None:
    _, _, base, source, plan = live
    (refs,) = plan.micro_batches(0)
    prepared = source.prepare(list(refs))
    shared = prepared[0].decision.caption
    prepared = [dataclasses.replace(p, decision=dataclasses.replace(p.decision, caption=shared))
                if k < 3 else p for k, p in enumerate(prepared)]
    calls = []
    hook = base.text_encoders[0].register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    try:
        batch = source.batch(prepared)
    finally:
        hook.remove()
    assert sum(calls) == 2  # captions encoded: the shared one and the fourth sample's own
    alone = encode_caption(base, shared)["prompt_embeds"]
    for row in range(3):
        assert torch.equal(batch.conditioning["prompt_embeds"][row], alone)
    last = encode_caption(base, prepared[3].decision.caption)["prompt_embeds"]
    assert torch.equal(batch.conditioning["prompt_embeds"][3], last)

