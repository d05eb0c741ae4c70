"""The held-out validation loss and the validation of a committed checkpoint at a step:
the same weights give the same loss (recomputed from scratch), other weights another;
an EMA adapter in the checkpoint is validated beside the raw one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from engine.data.prepared import load_dataset_for_task
from engine.infer.step_validation import validate_step
from engine.infer.validation_loss import loss_timesteps
from engine.lora.weights import LORA_FILE
from engine.store.commit import commit_checkpoint, read_checkpoint
from tests.support.engine import make_task, run_chain

CHANGES = {"validation.validation_steps": 4, "train_args.checkpointing_steps": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """8 steps in one segment: an in-segment checkpoint at step 4, the segment's at 8."""
    root = tmp_path_factory.mktemp("trained")
    task = make_task(**CHANGES)
    (result,) = run_chain(task, root)
    return {"task": task, "root": root, "data": load_dataset_for_task(task, None),
            "step4": str(root / "seg0" / "checkpoints" / "step-00000004"),
            "step8": result.checkpoint}


def test_the_loss_is_identical_when_recomputed_for_the_same_checkpoint(
    trained: dict, tmp_path: Path,
) -> None:
    task, data = trained["task"], trained["data"]
    first = validate_step(task, trained["step4"], str(tmp_path / "a"), data)
    again = validate_step(task, trained["step4"], str(tmp_path / "b"), data)  # a fresh model
    assert first.global_step == 4 and first.source == "training_subset"
    assert again.loss == first.loss
    assert (tmp_path / "a/validation/step-4/00.png").read_bytes() == \
        (tmp_path / "b/validation/step-4/00.png").read_bytes()
    record = json.loads((tmp_path / "a/validation/step-4/loss.json").read_text())
    assert record["timesteps"] == loss_timesteps(1000) == [125, 375, 625, 875]
    assert record["examples"] == 4 and record["loss"] == first.loss["raw"]

    later = validate_step(task, trained["step8"], str(tmp_path / "a"), data)
    assert later.global_step == 8 and later.loss["raw"] != first.loss["raw"]


def test_a_step_validated_before_is_found_not_recomputed(trained: dict, tmp_path: Path) -> None:
    task, data = trained["task"], trained["data"]
    first = validate_step(task, trained["step4"], str(tmp_path), data)
    loss_file = tmp_path / "validation/step-4/loss.json"
    written = loss_file.stat().st_mtime_ns
    assert validate_step(task, trained["step4"], str(tmp_path), data) == first
    assert loss_file.stat().st_mtime_ns == written


def test_the_validation_dataset_file_is_the_held_out_set(trained: dict, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for name, colour in (("red.png", (200, 30, 30)), ("green.png", (30, 200, 30))):
        Image.new("RGB", (80, 64), colour).save(tmp_path / "images" / name)
    rows = [{"prompt": "a red field", "image": "images/red.png", "seed": 5},
            {"prompt": "a green field", "image": "images/green.png", "negative_prompt": "text",
             "size": "64x64", "steps": 2}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = make_task(**CHANGES, **{"validation.dataset_file": str(tmp_path / "set.jsonl")})
    out = tmp_path / "out"
    done = validate_step(task, trained["step4"], str(out), trained["data"])
    assert done.source == "validation_dataset"
    assert done.prompts == ["a red field", "a green field"]
    assert [Path(u).name for u in done.images["raw"]] == ["00.png", "01.png"]
    record = json.loads((out / "validation/step-4/loss.json").read_text())
    assert record["examples"] == 2 and record["held_out_indexes"] == [0, 1]
    items = json.loads((out / "validation/step-4/prompts.json").read_text())["items"]
    assert items[0]["seed"] == 5 and items[1]["negative_prompt"] == "text"
    with Image.open(done.images["raw"][1]) as image:
        assert "Negative prompt: text" in image.info["parameters"]


def test_an_ema_adapter_is_validated_beside_the_raw_one(trained: dict, tmp_path: Path) -> None:
    """A checkpoint holding an EMA LoRA file (here: step 8's weights as the 'average' of
    step 4's checkpoint) gets ema/ images and an EMA loss, the raw ones unchanged."""
    task, data = trained["task"], trained["data"]
    step4, step8 = read_checkpoint(trained["step4"]), read_checkpoint(trained["step8"])
    with_ema = str(tmp_path / "with-ema")
    commit_checkpoint(with_ema, {**step4.files,
                                 "pytorch_lora_weights_ema.safetensors": step8.files[LORA_FILE]},
                      meta=dict(step4.meta))
    done = validate_step(task, with_ema, str(tmp_path / "out"), data)
    raw4 = validate_step(task, trained["step4"], str(tmp_path / "raw4"), data)
    raw8 = validate_step(task, trained["step8"], str(tmp_path / "raw8"), data)
    assert set(done.images) == {"raw", "ema"}
    assert [Path(u).relative_to(done.folder).as_posix() for u in done.images["ema"]] == \
        ["ema/00.png"]
    assert done.loss == {"raw": raw4.loss["raw"], "ema": raw8.loss["raw"]}
