"""Exact resume: k segments equal one run, bit for bit (the engine's central promise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.errors import LoraflowError
from engine.train.segment import SegmentOptions, run_segment
from tests.support.engine import checkpoint_bytes, make_task, run_chain

# 24 images, batch 5 (does not divide 24), accumulation 2: an epoch is 5 micro-batches
# in 3 optimizer steps, the last one short. Segments of 2 steps end mid-epoch at 2, 4, 8.


@pytest.mark.parametrize(
    "model, changes",
    [
        ("loraflow/tiny-sd1", {}),
        ("loraflow/tiny-sd2", {"train_args.snr_gamma": 5.0, "train_args.noise_offset": 0.05}),
    ],
    ids=["tiny-sd1", "tiny-sd2-vpred-minsnr"],
)
def test_four_segments_equal_one_run_bitwise(tmp_path: Path, model: str, changes: dict) -> None:
    one = make_task(**{"model.name": model, **changes})
    split = make_task(**{"model.name": model, "train_args.num_train_steps": 2, **changes})

    single = run_chain(one, tmp_path / "one")
    chain = run_chain(split, tmp_path / "split")

    assert [r.global_step for r in chain] == [2, 4, 6, 8]
    assert len(single) == 1 and single[0].finished and chain[-1].finished
    assert checkpoint_bytes(single[0].checkpoint) == checkpoint_bytes(chain[-1].checkpoint)


def test_random_crop_without_latent_cache_resumes_exactly(tmp_path: Path) -> None:
    one = make_task(**{"transforms.center_crop": False, "train_args.max_train_steps": 6,
                       "train_args.num_train_steps": 6})
    split = make_task(**{"transforms.center_crop": False, "train_args.max_train_steps": 6,
                         "train_args.num_train_steps": 2})
    single = run_chain(one, tmp_path / "one")
    chain = run_chain(split, tmp_path / "split")
    assert checkpoint_bytes(single[0].checkpoint) == checkpoint_bytes(chain[-1].checkpoint)


def test_same_seed_same_result_other_seed_different(tmp_path: Path) -> None:
    task = make_task(**{"train_args.max_train_steps": 3, "train_args.num_train_steps": 3})
    other = make_task(**{"train_args.max_train_steps": 3, "train_args.num_train_steps": 3,
                         "seed": 8})
    a = checkpoint_bytes(run_chain(task, tmp_path / "a")[0].checkpoint)
    b = checkpoint_bytes(run_chain(task, tmp_path / "b")[0].checkpoint)
    c = checkpoint_bytes(run_chain(other, tmp_path / "c")[0].checkpoint)
    assert a == b
    assert a["lora"] != c["lora"]


def test_training_from_cache_equals_encoding_every_step(tmp_path: Path) -> None:
    task = make_task(**{"train_args.max_train_steps": 4, "train_args.num_train_steps": 4})
    cached = run_chain(task, tmp_path / "cached", cache=True)
    live = run_chain(task, tmp_path / "live", cache=False)
    assert cached[0].cache is not None and live[0].cache is None
    assert checkpoint_bytes(cached[0].checkpoint) == checkpoint_bytes(live[0].checkpoint)


def test_resume_restores_the_lora_weights_not_a_fresh_adapter(tmp_path: Path) -> None:
    """Crynux's runner restarts the adapter each segment; the second segment must start
    from the first one's weights. With init true a restarted adapter has lora_B == 0."""
    task = make_task(**{"train_args.num_train_steps": 2, "train_args.max_train_steps": 4,
                        "lora.init_lora_weights": True})
    r0 = run_segment(task, str(tmp_path / "s0"), SegmentOptions(validate=False))
    trained = load_file(Path(r0.checkpoint) / "pytorch_lora_weights.safetensors")
    # A fresh adapter (init true) has lora_B == 0; the trained one must not.
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())
    frozen = make_task(**{"train_args.num_train_steps": 2, "train_args.max_train_steps": 4,
                          "lora.init_lora_weights": True})
    r1 = run_segment(frozen, str(tmp_path / "s1"),
                     SegmentOptions(checkpoint=r0.checkpoint, validate=False))
    assert r1.start_step == 2 and r1.global_step == 4 and r1.finished
    resumed = load_file(Path(r1.checkpoint) / "pytorch_lora_weights.safetensors")
    for key, before in trained.items():
        # One more step of Adam moves each weight by about lr at most: far from a reset.
        assert (resumed[key] - before).abs().max() < 0.05, key


def test_checkpoint_from_a_different_task_is_refused_naming_the_field(tmp_path: Path) -> None:
    task = make_task(**{"train_args.num_train_steps": 1, "train_args.max_train_steps": 2})
    r0 = run_segment(task, str(tmp_path / "s0"), SegmentOptions(validate=False))
    changed = make_task(**{"train_args.num_train_steps": 1, "train_args.max_train_steps": 2,
                           "lora.rank": 8})
    with pytest.raises(LoraflowError, match=r"/lora/rank: checkpoint has 4, task has 8"):
        run_segment(changed, str(tmp_path / "s1"),
                    SegmentOptions(checkpoint=r0.checkpoint, validate=False))
    assert not (tmp_path / "s1" / "checkpoint" / "manifest.json").exists()


def test_finished_checkpoint_is_marked_and_state_records_position(tmp_path: Path) -> None:
    task = make_task(**{"train_args.num_train_steps": 4, "train_args.max_train_steps": 4})
    result = run_segment(task, str(tmp_path / "s0"), SegmentOptions(validate=False))
    folder = Path(result.checkpoint)
    state = json.loads((folder / "training_state.json").read_text())
    assert result.finished and (folder / "FINISH").exists()
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 1, 1)
    assert json.loads((folder / "manifest.json").read_text())["finished"] is True
