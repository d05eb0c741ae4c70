"""SDXL and text-encoder LoRA keep every promise SD 1.x makes: exact resume, cache, time box."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.data.transforms import CropPlan
from engine.model.family import UnsupportedModelError, sdxl_time_ids
from engine.model.loading import inspect_model
from engine.task.definition import ModelArgs
from engine.train.samples import SampleDecisions, crop_top_left
from engine.train.segment import SegmentOptions, run_segment
from tests.support.engine import checkpoint_bytes, make_task, run_budgeted, run_chain

SDXL = {"model.name": "loraflow/tiny-sdxl"}
TEXT_LORA = {"lora.text_encoder": {"rank": 2, "learning_rate": 5e-4}}


@pytest.mark.parametrize(
    "changes",
    [
        {**SDXL, "transforms.center_crop": False},
        {**SDXL, "transforms.center_crop": True},
        {**SDXL, **TEXT_LORA},
        {**TEXT_LORA},
    ],
    ids=["sdxl-random-crop", "sdxl-cached-latents", "sdxl-text-lora", "sd1-text-lora"],
)
def test_three_segments_equal_one_run_bitwise(tmp_path: Path, changes: dict) -> None:
    one = run_chain(make_task(**changes), tmp_path / "one")
    split = run_chain(make_task(**changes, **{"train_args.num_train_steps": 3}), tmp_path / "split")
    assert [r.global_step for r in split] == [3, 6, 8]
    assert checkpoint_bytes(one[0].checkpoint) == checkpoint_bytes(split[-1].checkpoint)


def test_sdxl_training_from_cache_equals_encoding_every_step(tmp_path: Path) -> None:
    task = make_task(**SDXL, **{"train_args.num_train_steps": 3, "train_args.max_train_steps": 3})
    cached = run_chain(task, tmp_path / "cached", cache=True)
    live = run_chain(task, tmp_path / "live", cache=False)
    assert cached[0].cache is not None
    assert checkpoint_bytes(cached[0].checkpoint) == checkpoint_bytes(live[0].checkpoint)


def test_text_encoder_lora_is_saved_for_both_sdxl_encoders_and_skips_the_caption_cache(
    tmp_path: Path,
) -> None:
    task = make_task(**SDXL, **TEXT_LORA,
                     **{"train_args.num_train_steps": 2, "train_args.max_train_steps": 2})
    result = run_segment(task, str(tmp_path / "s"),
                         SegmentOptions(cache_root=str(tmp_path / "c"), validate=True))
    weights = load_file(Path(result.checkpoint) / "pytorch_lora_weights.safetensors")
    prefixes = {k.split(".")[0] for k in weights}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    cache_files = {p.name for p in Path(result.cache).iterdir()}
    assert "latents.safetensors" in cache_files and "text.safetensors" not in cache_files
    assert len(result.validation) == 1  # rendered through StableDiffusionXLPipeline


def test_sdxl_budgeted_segment_commits_in_time_and_resumes_exactly(tmp_path: Path) -> None:
    steps = {"train_args.num_train_steps": 60, "train_args.max_train_steps": 60,
             "train_args.batch_size": 2, "train_args.gradient_accumulation_steps": 1}
    task = make_task(**SDXL, **steps)
    cache = str(tmp_path / "cache")
    reference = run_segment(task, str(tmp_path / "ref"),
                            SegmentOptions(cache_root=cache, validate=False))
    budgeted = run_budgeted(task, tmp_path / "b0", cache, budget=1.5)
    first = budgeted.result
    assert budgeted.elapsed < budgeted.budget, budgeted.overrun_message()
    assert first.stopped_by == "budget" and 0 < first.global_step < 60
    rest = run_segment(task, str(tmp_path / "b1"),
                       SegmentOptions(cache_root=cache, validate=False,
                                      checkpoint=first.checkpoint))
    assert checkpoint_bytes(rest.checkpoint) == checkpoint_bytes(reference.checkpoint)


def test_sdxl_time_ids_carry_the_true_crop_of_each_sample() -> None:
    plan = CropPlan(original_size=(80, 96), resized_size=(64, 77), top=0, left=5, resolution=64)
    plain = SampleDecisions("c", plan, flip=False)
    flipped = SampleDecisions("c", plan, flip=True)
    assert crop_top_left(plain) == (0, 5)
    assert crop_top_left(flipped) == (0, 77 - 5 - 64)  # the crop as seen in the mirrored image
    ids = sdxl_time_ids([(80, 96), (80, 96)], [(0, 5), (0, 8)], (64, 64))
    assert ids.tolist() == [[80, 96, 0, 5, 64, 64], [80, 96, 0, 8, 64, 64]]


def test_sd2_at_768_with_v_prediction_and_min_snr_trains(tmp_path: Path) -> None:
    task = make_task(**{"model.name": "loraflow/tiny-sd2", "train_args.resolution": 768,
                        "train_args.batch_size": 1, "train_args.gradient_accumulation_steps": 1,
                        "train_args.num_train_steps": 2, "train_args.max_train_steps": 2,
                        "train_args.snr_gamma": 5.0})
    result = run_segment(task, str(tmp_path / "s"), SegmentOptions(validate=False))
    records = [json.loads(line) for line in Path(result.metrics).read_text().splitlines()]
    assert result.finished and all(r["loss"] > 0 for r in records)
    assert inspect_model(task.model)[1].default_prediction_type == "v_prediction"


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_unsupported_families_are_named_in_a_clear_error(tmp_path: Path, pipeline: str) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(UnsupportedModelError, match=f"model is a {pipeline}"):
        inspect_model(ModelArgs(name=str(tmp_path)))


def test_family_is_read_from_the_model_not_its_name(tiny_sd1: str, tiny_sd2: str,
                                                    tiny_sdxl: str) -> None:
    names = [inspect_model(ModelArgs(name=p))[1].name for p in (tiny_sd1, tiny_sd2, tiny_sdxl)]
    assert names == ["sd1", "sd2", "sdxl"]


def test_tiny_sdxl_example_runs_to_finish(tmp_path: Path) -> None:
    from engine.task.validation import load_task

    root = Path(__file__).resolve().parents[3]
    task = load_task(str(root / "examples" / "tiny-sdxl.json"))
    results = run_chain(task, tmp_path, validate=False)
    assert [r.global_step for r in results] == [10, 20, 30]
    assert (Path(results[-1].checkpoint) / "FINISH").exists()
