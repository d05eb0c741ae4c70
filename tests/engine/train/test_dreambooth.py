"""DreamBooth prior preservation on tiny-sd1: the class subset trains beside the instance
images with its loss scaled by prior_loss_weight, and k segments equal one run bitwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.data.class_subset import CLASS_SUBSET_NAME
from engine.data.prepared import load_dataset_for_task
from engine.model.loading import load_base_model, training_device
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource
from engine.train.trainer import build_trainer, micro_batch_loss
from tests.support.engine import checkpoint_bytes, make_task, run_chain

pytestmark = pytest.mark.timeout(600)

CLASS = {"class_prompt": "a shape", "num_class_images": 3, "num_inference_steps": 2,
         "batch_size": 3, "resolution": 32}


def _task(prior_loss_weight: float, **changes: object):
    return make_task(dreambooth={**CLASS, "prior_loss_weight": prior_loss_weight}, **changes)


def _sample_losses(task, root: str) -> list[tuple[bool, float]]:
    """(is a class image, loss) of every sample of epoch 0, one sample per micro-batch."""
    data = load_dataset_for_task(task, root)
    base = load_base_model(task, training_device())
    plan = TrainingPlan.for_task(task, data)
    trainer = build_trainer(task, base, plan)
    source = SampleSource(task, data, base, None)
    out = []
    with torch.no_grad():
        for refs in plan.epoch_batches(0):
            (ref,) = refs
            loss = micro_batch_loss(trainer, source.batch(source.prepare([ref])))
            out.append((data.subset_of(ref.index) == len(data.parts) - 1, float(loss)))
    return out


def test_prior_loss_weight_scales_only_the_class_samples_loss(tmp_path: Path) -> None:
    small = {"train_args.batch_size": 1, "train_args.gradient_accumulation_steps": 1}
    plain = _sample_losses(_task(1.0, **small), str(tmp_path))
    weighted = _sample_losses(_task(3.0, **small), str(tmp_path))
    assert sum(is_class for is_class, _ in plain) == 3
    assert [c for c, _ in plain] == [c for c, _ in weighted]  # same data order
    for (is_class, loss), (_, weighted_loss) in zip(plain, weighted, strict=True):
        assert loss > 0
        assert weighted_loss == pytest.approx(loss * (3.0 if is_class else 1.0), rel=1e-6)


def test_k_segments_equal_one_run_bitwise_with_dreambooth(tmp_path: Path) -> None:
    one = _task(0.5)
    split = _task(0.5, **{"train_args.num_train_steps": 3})
    single = run_chain(one, tmp_path / "one")
    chain = run_chain(split, tmp_path / "split")
    assert [r.global_step for r in chain] == [3, 6, 8]
    assert checkpoint_bytes(single[0].checkpoint) == checkpoint_bytes(chain[-1].checkpoint)
    subsets = single[0].data["subsets"]
    assert subsets[-1]["name"] == CLASS_SUBSET_NAME
    assert (subsets[-1]["images"], subsets[-1]["loss_weight"]) == (3, 0.5)


def test_the_prior_loss_weight_is_part_of_the_training_identity(tmp_path: Path) -> None:
    from engine.train.state import training_identity

    data = load_dataset_for_task(_task(0.5), str(tmp_path))
    ids = [training_identity(_task(w), data.content_hash, data.subset_hashes) for w in (0.5, 1)]
    assert ids[0] != ids[1]
    assert ids[0]["dreambooth"]["class_images"] == data.subset_hashes[-1]
