"""Verifiable segments: each checkpoint's digest trail, and ``verify_segment`` replaying a
quarter of a segment to catch wrong work that every file hash and checksum lets through.

Two segments of 8 steps on tiny-sd1 with an in-segment checkpoint every step; the second
segment (steps 8-16, input: the first one's checkpoint) is verified honest and forged.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from engine.lora.weights import LORA_FILE
from engine.store.commit import CheckpointError, read_checkpoint, read_manifest
from engine.train.digests import (
    TRAIL_KEY,
    DigestTrail,
    TrailError,
    digest_every,
    weights_digest,
)
from engine.train.options import SegmentOptions
from engine.train.saver import INTERMEDIATE_DIR
from engine.train.segment import run_segment
from engine.train.verify import DEFAULT_SAMPLE, verify_segment
from engine.train.verify_windows import UnverifiableError, pick_windows, windows_between
from tests.support.engine import make_task, run_chain
from tests.support.forgery import (
    copy_segment,
    nudged_lora,
    recommit,
    relabel,
    state_digests,
    with_last_point,
)

pytestmark = pytest.mark.timeout(600)

STEPS = {"train_args.num_train_steps": 8, "train_args.max_train_steps": 16,
         "train_args.checkpointing_steps": 1}


@pytest.fixture(scope="module")
def task():
    return make_task(**STEPS)


@pytest.fixture(scope="module")
def chain(task, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("honest")
    results = run_chain(task, root)
    assert len(results) == 2
    return {"root": str(root), "a": results[0].checkpoint, "b": results[1].checkpoint,
            "cache": str(root / "cache")}


def _verify(task, chain, b: str | Path | None = None, **kwargs):
    return verify_segment(task, chain["a"], str(b or chain["b"]), cache_root=chain["cache"],
                          **kwargs)


def _forged_segment(chain, tmp_path: Path) -> Path:
    return copy_segment(Path(chain["b"]).parent, tmp_path / "forged")


# -- the trail ---------------------------------------------------------------------------


def test_each_checkpoint_holds_its_segments_trail_from_its_first_step(chain) -> None:
    first = DigestTrail.from_meta(read_manifest(chain["a"]).meta, "a")
    second = DigestTrail.from_meta(read_manifest(chain["b"]).meta, "b")
    assert (first.start, first.end) == (0, 8)
    assert (second.start, second.end) == (8, 16)
    assert [p.step for p in second.points] == list(range(8, 17))
    assert second.points[0].loss is None  # the input state: no step trained yet
    assert all(math.isfinite(float.fromhex(p.loss)) for p in second.points[1:])
    # the segment's first point is the input checkpoint's last: the trail continues
    assert second.points[0].weights == first.points[-1].weights


def test_in_segment_checkpoints_hold_the_trail_so_far(chain) -> None:
    final = DigestTrail.from_meta(read_manifest(chain["b"]).meta, "b")
    step12 = Path(chain["b"]).parent / INTERMEDIATE_DIR / "step-00000012"
    partial = DigestTrail.from_meta(read_manifest(str(step12)).meta, "step 12")
    assert partial.points == final.up_to(12).points


def test_a_resumed_attempt_continues_the_trail_it_left(task, chain, tmp_path: Path) -> None:
    def crash_after_step_11(report) -> None:
        if report.global_step == 11:
            raise RuntimeError("killed")

    out = tmp_path / "seg1"
    with pytest.raises(RuntimeError):
        run_segment(task, str(out), SegmentOptions(checkpoint=chain["a"], validate=False,
                                                   cache_root=chain["cache"],
                                                   on_step=crash_after_step_11))
    again = run_segment(task, str(out), SegmentOptions(checkpoint=chain["a"], validate=False,
                                                       cache_root=chain["cache"]))
    resumed = read_manifest(again.checkpoint).meta[TRAIL_KEY]
    assert resumed == read_manifest(chain["b"]).meta[TRAIL_KEY]


def test_one_ulp_moves_the_weights_digest() -> None:
    weights = {"w": torch.linspace(-1, 1, 10)}
    nudged = {"w": weights["w"].clone()}
    nudged["w"][3] = torch.nextafter(nudged["w"][3], torch.tensor(2.0))
    assert weights_digest(weights) != weights_digest(nudged)
    assert weights_digest(weights) == weights_digest({"w": weights["w"].clone()})


def test_default_spacing_gives_about_sixteen_points_a_segment() -> None:
    assert digest_every(None, 8) == 1
    assert digest_every(None, 1000) == 62
    assert digest_every(5, 1000) == 5


# -- the windows -------------------------------------------------------------------------


def test_the_last_window_is_always_replayed_and_the_rest_stay_within_the_sample() -> None:
    states = list(range(0, 100, 5))  # a state every 5 steps
    seen: dict[int, int] = {}
    for seed in range(400):
        chosen = pick_windows(states, 100, 0.25, seed)
        assert chosen[-1].end == 100
        assert sum(w.steps for w in chosen) <= 25
        for w in chosen[:-1]:
            seen[w.start] = seen.get(w.start, 0) + 1
    # every other window is drawn, each about (5 - 1) / 19 of the time
    assert sorted(seen) == states[:-1]
    assert all(0.12 < n / 400 < 0.30 for n in seen.values())


def test_a_segment_without_states_near_its_end_is_refused_not_fully_replayed() -> None:
    assert windows_between([0], 8)[0].steps == 8
    with pytest.raises(UnverifiableError, match="checkpointing_steps <= 2"):
        pick_windows([0], 8, 0.25, seed=1)


# -- verdicts ----------------------------------------------------------------------------


def test_an_honest_segment_passes_at_a_quarter_of_its_steps(task, chain) -> None:
    verdict = _verify(task, chain, seed=5)
    assert verdict.passed, verdict.lines()
    assert DEFAULT_SAMPLE == 0.25
    assert verdict.replayed_steps == 2  # 8 steps: the last window and one random one
    assert verdict.cost <= 0.25
    assert verdict.windows[-1].end == 16


def test_an_honest_first_segment_passes_from_the_initial_weights(task, chain) -> None:
    verdict = verify_segment(task, None, chain["a"], cache_root=chain["cache"], sample=1.0,
                             seed=0)
    assert verdict.passed, verdict.lines()
    assert verdict.replayed_steps == 8


def test_a_weight_one_ulp_off_with_a_consistent_trail_is_caught(task, chain,
                                                                tmp_path: Path) -> None:
    b = _forged_segment(chain, tmp_path) / "checkpoint"
    loaded = read_checkpoint(str(b))
    recommit(b, files={LORA_FILE: nudged_lora(loaded.files[LORA_FILE])})
    last = loaded.manifest.meta[TRAIL_KEY]["points"][-1]
    recommit(b, meta=with_last_point(loaded.manifest.meta, state_digests(task, b),
                                     last["loss"]))
    verdict = _verify(task, chain, b, seed=5)
    assert not verdict.passed
    assert verdict.mismatch.startswith("step 16: weights of the replay from step 15")


def test_a_weight_one_ulp_off_under_the_honest_trail_is_caught_without_replaying_more(
        task, chain, tmp_path: Path) -> None:
    b = _forged_segment(chain, tmp_path) / "checkpoint"
    recommit(b, files={LORA_FILE: nudged_lora(read_checkpoint(str(b)).files[LORA_FILE])})
    verdict = _verify(task, chain, b, seed=5)
    assert verdict.mismatch == ("step 16: weights of the output checkpoint differ from the "
                                "segment's digest trail")


def test_a_skipped_step_is_caught(task, chain, tmp_path: Path) -> None:
    """The state after step 15 passed off as step 16 (one step fewer, relabelled), with a
    trail whose last point is that state's hash."""
    segment = _forged_segment(chain, tmp_path)
    b, step15 = segment / "checkpoint", segment / INTERMEDIATE_DIR / "step-00000015"
    honest = read_checkpoint(str(b))
    shutil.rmtree(b)
    shutil.copytree(step15, b)
    recommit(b, state={"global_step": 16}, meta={"global_step": 16, "finished": True})
    trail = honest.manifest.meta[TRAIL_KEY]
    recommit(b, meta=with_last_point(honest.manifest.meta, state_digests(task, b),
                                     trail["points"][-2]["loss"]))
    verdict = _verify(task, chain, b, seed=5)
    assert not verdict.passed
    assert verdict.mismatch.startswith("step 16: loss and weights and optimizer of the replay")


def test_another_seeds_work_passed_off_as_this_tasks_is_caught(task, chain,
                                                               tmp_path: Path) -> None:
    other = make_task(**STEPS, seed=8)
    results = run_chain(other, tmp_path / "other")
    segment = copy_segment(Path(results[1].checkpoint).parent, tmp_path / "forged")
    relabel(segment, task)
    verdict = _verify(task, chain, segment / "checkpoint", seed=5)
    assert not verdict.passed
    assert verdict.mismatch.startswith("step ")


# -- refused input ------------------------------------------------------------------------


def test_a_hand_edited_trail_is_refused_by_the_manifest_checksum(task, chain,
                                                                 tmp_path: Path) -> None:
    b = _forged_segment(chain, tmp_path) / "checkpoint"
    manifest = b / "manifest.json"
    document = json.loads(manifest.read_text())
    document[TRAIL_KEY]["points"][-1]["weights"] = "0" * 64
    manifest.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="manifest_sha256 mismatch"):
        _verify(task, chain, b)


@pytest.mark.parametrize(("change", "message"), [
    ({TRAIL_KEY: None}, "has no digest trail"),
    ({TRAIL_KEY: {"format": "loraflow-digests/1", "every": 1, "start": 8, "end": 16,
                  "points": [{"step": 8, "loss": None, "weights": "x", "optimizer": "y"}]}},
     r"points\[0\]\.weights must be a sha256"),
    ({TRAIL_KEY: {"format": "loraflow-digests/1", "every": 1, "start": 8, "end": 16,
                  "points": "all of them"}}, "'points' must be a non-empty list"),
])
def test_a_malformed_trail_is_a_clear_error(task, chain, tmp_path: Path, change,
                                           message) -> None:
    b = _forged_segment(chain, tmp_path) / "checkpoint"
    if change[TRAIL_KEY] is None:
        recommit(b, drop=(TRAIL_KEY,))
    else:
        recommit(b, meta=change)
    with pytest.raises(TrailError, match=message):
        _verify(task, chain, b)


def test_a_segment_whose_in_segment_checkpoints_are_gone_is_unverifiable(
        task, chain, tmp_path: Path) -> None:
    segment = _forged_segment(chain, tmp_path)
    shutil.rmtree(segment / INTERMEDIATE_DIR)
    with pytest.raises(UnverifiableError, match="cannot be verified at --sample 0.25"):
        _verify(task, chain, segment / "checkpoint")
