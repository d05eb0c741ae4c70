"""Full fine-tune (training_type "full"): every UNet weight trains, resumes exactly, and is
published as a diffusers model folder and a single-file checkpoint in the SD layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import LoraflowError
from engine.model.embedded.registry import resolve_model
from engine.train.full_finetune import WEIGHTS_FILE
from tests.support.engine import make_task, run_chain

FULL = {"training_type": "full", "train_args.learning_rate": 1e-4}


def full_checkpoint_bytes(checkpoint: str) -> dict[str, bytes]:
    folder = Path(checkpoint)
    state = json.loads((folder / "training_state.json").read_text())
    exact = {k: state[k] for k in ("global_step", "epoch", "step_in_epoch", "optimizer",
                                   "lr_scheduler")}
    return {
        "weights": (folder / WEIGHTS_FILE).read_bytes(),
        "optimizer": (folder / "optimizer.safetensors").read_bytes(),
        "state": json.dumps(exact, sort_keys=True).encode(),
    }


def test_full_finetune_three_segments_equal_one_run_bitwise(tmp_path: Path) -> None:
    steps = {"train_args.max_train_steps": 6}
    one = make_task(**FULL, **steps, **{"train_args.num_train_steps": 6})
    split = make_task(**FULL, **steps, **{"train_args.num_train_steps": 2})

    single = run_chain(one, tmp_path / "one")
    chain = run_chain(split, tmp_path / "split")

    assert [r.global_step for r in chain] == [2, 4, 6]
    assert full_checkpoint_bytes(single[0].checkpoint) == full_checkpoint_bytes(
        chain[-1].checkpoint)


def test_full_checkpoint_holds_every_unet_weight_changed_and_no_lora_file(
        tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    task = make_task(**FULL, **{"train_args.max_train_steps": 2,
                                "train_args.num_train_steps": 2})
    result = run_chain(task, tmp_path)[-1]
    folder = Path(result.checkpoint)
    assert not (folder / "pytorch_lora_weights.safetensors").exists()
    trained = load_file(folder / WEIGHTS_FILE)
    moments = load_file(folder / "optimizer.safetensors")
    original = UNet2DConditionModel.from_pretrained(resolve_model("loraflow/tiny-sd1"),
                                                    subfolder="unet").state_dict()
    assert sorted(trained) == sorted(f"unet.{k}" for k in original)
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert {k.split("::")[0] for k in moments} <= set(trained)
    changed = [k for k in original if not torch.equal(original[k], trained[f"unet.{k}"])]
    assert len(changed) > len(original) // 2  # AdamW moves nearly every weight


def test_full_finetune_with_text_encoder_trains_it_and_resumes_exactly(tmp_path: Path) -> None:
    te = {"full_finetune.train_text_encoder": True, "train_args.max_train_steps": 4}
    one = make_task(**FULL, **te, **{"train_args.num_train_steps": 4})
    split = make_task(**FULL, **te, **{"train_args.num_train_steps": 2})
    single = run_chain(one, tmp_path / "one")
    chain = run_chain(split, tmp_path / "split")
    assert full_checkpoint_bytes(single[0].checkpoint) == full_checkpoint_bytes(
        chain[-1].checkpoint)
    trained = load_file(Path(single[0].checkpoint) / WEIGHTS_FILE)
    assert any(k.startswith("text_encoder.") for k in trained)


def test_lora_checkpoint_is_not_resumed_as_a_full_finetune(tmp_path: Path) -> None:
    lora = make_task(**{"train_args.max_train_steps": 4, "train_args.num_train_steps": 2})
    from engine.train.segment import SegmentOptions, run_segment

    r0 = run_segment(lora, str(tmp_path / "s0"), SegmentOptions(validate=False))
    full = make_task(**FULL, **{"train_args.max_train_steps": 4,
                                "train_args.num_train_steps": 2})
    with pytest.raises(LoraflowError, match="training_type"):
        run_segment(full, str(tmp_path / "s1"),
                    SegmentOptions(checkpoint=r0.checkpoint, validate=False))


@pytest.mark.parametrize("changes, message", [
    ({"training_type": "full", "lora.text_encoder": {"rank": 4}}, "full_finetune.train_text"),
    ({"full_finetune.train_text_encoder": True}, "training_type"),
])
def test_contradictory_training_type_settings_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(LoraflowError, match=message):
        make_task(**changes)


# -- publishing: a diffusers folder and a single file in the original SD layout ----------


def _pipeline_class(family: str):  # noqa: ANN202 - a diffusers class
    import diffusers

    return diffusers.StableDiffusionXLPipeline if family == "sdxl" else \
        diffusers.StableDiffusionPipeline


def test_published_full_model_loads_back_with_the_trained_unet(tmp_path: Path) -> None:
    from engine.model.full_export import publish_full_model

    task = make_task(**FULL, **{"train_args.max_train_steps": 2,
                                "train_args.num_train_steps": 2})
    result = run_chain(task, tmp_path / "run")[-1]
    published = publish_full_model(result.checkpoint, task, str(tmp_path / "out"), "my_model")
    trained = load_file(Path(result.checkpoint) / WEIGHTS_FILE)
    pipe_cls = _pipeline_class("sd1")
    no_checker = {"safety_checker": None, "requires_safety_checker": False}

    folder = pipe_cls.from_pretrained(published["diffusers_model"], **no_checker)
    single = pipe_cls.from_single_file(published["single_file"],
                                       config=published["diffusers_model"],
                                       local_files_only=True, **no_checker)

    for pipe in (folder, single):
        unet = pipe.unet.state_dict()
        assert sorted(f"unet.{k}" for k in unet) == sorted(trained)
        assert all(torch.equal(unet[k], trained[f"unet.{k}"]) for k in unet)
    keys = load_file(published["single_file"]).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert not any("_name_or_path" in p.read_text()
                   for p in Path(published["diffusers_model"]).rglob("*.json"))


@pytest.mark.parametrize("name, family", [("loraflow/tiny-sd1", "sd1"),
                                          ("loraflow/tiny-sd2", "sd2"),
                                          ("loraflow/tiny-sdxl", "sdxl")])
def test_single_file_layout_round_trips_through_diffusers_from_single_file(
        tmp_path: Path, name: str, family: str) -> None:
    """Every component comes back bit for bit through diffusers' own single-file reader.

    SDXL's second encoder is read with diffusers' OpenCLIP converter directly: the tiny
    model's two encoders have the same width, which from_single_file uses to tell them
    apart (real SDXL: 768 and 1280)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import save_file

    from engine.model.single_file import single_file_state

    location = resolve_model(name)
    cls = _pipeline_class(family)
    extra = {} if family == "sdxl" else {"safety_checker": None,
                                         "requires_safety_checker": False}
    pipe = cls.from_pretrained(location, **extra)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    state = single_file_state(family, pipe.unet, pipe.vae, encoders)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))

    back = cls.from_single_file(str(path), config=location, local_files_only=True, **extra)

    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, component).state_dict(), getattr(back, component).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    if family == "sdxl":
        prefix = "conditioner.embedders.1.model."
        converted = convert_open_clip_checkpoint(pipe.text_encoder_2, state, prefix=prefix)
        ours = {(k if k.startswith("text_projection") else f"text_model.{k}"
                 if not k.startswith("text_model.") else k): v
                for k, v in pipe.text_encoder_2.state_dict().items()}
        assert converted.keys() == ours.keys()
        assert all(torch.equal(ours[k], converted[k]) for k in ours)
