"""The EMA of the trained weights: its schedule, exact swaps, k segments == 1 run with it
kept in the checkpoint, and published files that say which weights they hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.lora.publish import publish_lora
from engine.lora.weights import LORA_FILE
from engine.store.safetensors_io import read_metadata
from engine.task.definition import EmaArgs
from engine.train.ema import EMA_FILE, Ema
from tests.support.engine import checkpoint_bytes, make_task, run_chain

EMA = {"decay": 0.8, "start_step": 2, "update_every": 2}


def test_the_average_follows_the_weights_until_start_then_updates_every_n_steps() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = Ema.of(EmaArgs(decay=0.5, start_step=1, update_every=2), {"w": weight})
    seen = []
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        with torch.no_grad():
            weight.fill_(value)
        ema.update({"w": weight}, step)
        seen.append(ema.shadow["w"][0].item())
    # step 1: = weights; 2: not due; 3: 0.5*1 + 0.5*3; 4: not due; 5: 0.5*2 + 0.5*5
    assert seen == [1.0, 1.0, 2.0, 2.0, 3.5]


def test_swapping_the_average_in_gives_the_raw_weights_back_bit_for_bit() -> None:
    weight = torch.nn.Parameter(torch.randn(64) / 3)
    raw = weight.detach().clone()
    ema = Ema.of(EmaArgs(decay=0.9), {"w": weight})
    ema.shadow["w"].mul_(1.0 / 7)
    with ema.swapped_in({"w": weight}):
        assert torch.equal(weight, ema.shadow["w"])
    assert torch.equal(weight, raw)


def test_three_segments_with_ema_give_the_bytes_of_one_run(tmp_path: Path) -> None:
    one = run_chain(make_task(**{"train_args.ema": EMA}), tmp_path / "one")
    three = run_chain(make_task(**{"train_args.ema": EMA, "train_args.num_train_steps": 3}),
                      tmp_path / "three")
    assert len(three) == 3
    a, b = Path(one[-1].checkpoint), Path(three[-1].checkpoint)
    assert checkpoint_bytes(str(a)) == checkpoint_bytes(str(b))
    assert (a / EMA_FILE).read_bytes() == (b / EMA_FILE).read_bytes()
    ema, raw = load_tensors((a / EMA_FILE).read_bytes()), load_tensors((a / LORA_FILE).read_bytes())
    assert sorted(ema) == sorted(raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_a_task_without_ema_writes_no_ema_file(tmp_path: Path) -> None:
    result = run_chain(make_task(**{"train_args.num_train_steps": 8}), tmp_path)[-1]
    assert not (Path(result.checkpoint) / EMA_FILE).exists()


@pytest.mark.parametrize("chosen", ["ema", "raw"])
def test_published_files_hold_the_chosen_weights_and_say_so(chosen: str,
                                                            tmp_path: Path) -> None:
    task = make_task(**{"train_args.ema": {**EMA, "publish": chosen, "publish_both": True}})
    checkpoint = Path(run_chain(task, tmp_path / "train")[-1].checkpoint)
    published = publish_lora(str(checkpoint), task, str(tmp_path / "out"), dataset_hash="h",
                             captions=["a"], validation_images=[], metrics_url=None,
                             run_summary={"run_name": "shapes"})
    other = "raw" if chosen == "ema" else "ema"
    source = {"ema": EMA_FILE, "raw": LORA_FILE}
    main = Path(published["diffusers"]).read_bytes()
    second = Path(published[f"diffusers_{other}"]).read_bytes()
    assert Path(published["diffusers"]).name == LORA_FILE
    assert Path(published[f"diffusers_{other}"]).name == f"pytorch_lora_weights_{other}.safetensors"
    assert Path(published[f"kohya_{other}"]).name == f"loraflow_shapes_{other}.safetensors"
    for data, label in ((main, chosen), (second, other)):
        want = load_tensors((checkpoint / source[label]).read_bytes())
        assert load_tensors(data).keys() == want.keys()
        assert all(torch.equal(load_tensors(data)[k], want[k]) for k in want)
        assert read_metadata(data)["loraflow_weights"] == label
    assert read_metadata(Path(published["kohya"]).read_bytes())["loraflow_weights"] == chosen
    card = Path(published["readme"]).read_text()
    assert "## Weights: EMA or raw" in card
    assert f"The files without a suffix hold the {chosen} weights" in card


def test_final_validation_renders_the_weights_that_are_published(tmp_path: Path) -> None:
    """The card's images are of the file users get: the EMA by default, the raw weights
    with ``publish: raw``."""
    from engine.data.prepared import load_dataset_for_task
    from engine.infer.validation import validate_checkpoint

    ema = {**EMA, "decay": 0.5}
    task = make_task(**{"train_args.ema": ema})
    checkpoint = run_chain(task, tmp_path / "run")[-1].checkpoint
    data = load_dataset_for_task(task, None)
    pngs = {}
    for chosen in ("ema", "raw"):
        chosen_task = make_task(**{"train_args.ema": {**ema, "publish": chosen}})
        images = validate_checkpoint(chosen_task, checkpoint, str(tmp_path / chosen), data)
        pngs[chosen] = [Path(u).read_bytes() for u in images.lora]
        assert [Path(u).read_bytes() for u in images.base] != pngs[chosen]
    assert pngs["ema"] != pngs["raw"]
