"""Data parallel inside a segment (engine/train/distributed.py), on CPU with gloo.

The collectives run in two real gloo processes (tests/support/distributed.py). The
segment tests launch ``loraflow segment --nproc-per-node 2`` for real and
compare with one process: two runs with two processes are identical bit for bit, a
checkpoint moves between world sizes, the two agree up to the order of float additions,
and the time box stops both ranks at the same step. Every subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.errors import ConfigurationError
from engine.train.distributed import (
    SINGLE,
    World,
    agreed_stop,
    share,
    sum_gradients,
    world_from_env,
)
from engine.train.options import StopReason
from engine.train.plan import SampleRef
from engine.train.segment import SegmentOptions, run_segment
from tests.support.distributed import run_ranks
from tests.support.engine import checkpoint_bytes, make_task

ROOT = Path(__file__).resolve().parents[3]
LORA = "pytorch_lora_weights.safetensors"
#: 2 processes vs 1 on tiny-sd1 may differ only by float reduction order (measured:
#: docs/distributed.md quotes the value).
TOLERANCE = 1e-5


# -- the world and the split ----------------------------------------------------------


def test_world_comes_from_torchruns_environment() -> None:
    assert World().writes and not World().distributed
    assert World() == SINGLE
    assert world_from_env({}) == SINGLE
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) == SINGLE
    w = world_from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.backend, w.writes) == (1, 2, "gloo", False)
    with pytest.raises(ConfigurationError, match="RANK=2, WORLD_SIZE=2"):
        world_from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigurationError, match="must be integers"):
        world_from_env({"WORLD_SIZE": "two", "RANK": "0"})


def test_the_shares_of_a_micro_batch_hold_each_sample_once() -> None:
    refs = [SampleRef(epoch=0, index=i) for i in range(5)]
    for size in (1, 2, 3, 7):
        shares = [share(refs, World(r, size, r, "gloo")) for r in range(size)]
        dealt = sorted(ref.index for s in shares for ref in s)
        assert dealt == [0, 1, 2, 3, 4]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert share(refs, SINGLE) is refs


def test_one_process_runs_no_collective() -> None:
    # no process group exists here: any collective would raise
    assert sum_gradients([], 0.5, SINGLE) == 0.5
    assert agreed_stop(SINGLE, StopReason.BUDGET) is StopReason.BUDGET
    assert agreed_stop(SINGLE, None) is None


# -- the collectives, in two gloo processes ------------------------------------------


def test_summed_gradients_are_the_same_on_every_rank(tmp_path: Path) -> None:
    reports = run_ranks("gradients", tmp_path)
    assert reports[0] == reports[1]
    assert reports[0]["a"] == [3.0, 6.0, 9.0]  # (1 + 2) x [1, 2, 3]
    assert reports[0]["b"] == [0.5, 0.25, 0.125]  # only rank 1 computed it
    assert reports[0]["c"] is None  # no rank did: the optimizer skips it, as with one
    assert reports[0]["loss"] == 0.75


def test_one_ranks_stop_stops_every_rank(tmp_path: Path) -> None:
    reports = run_ranks("stops", tmp_path)
    assert reports[0] == reports[1] == {
        "budget": "budget", "signal": "signal", "steps": "steps", "going_on": None,
    }


def test_ranks_with_different_weights_are_refused_before_a_commit(tmp_path: Path) -> None:
    reports = run_ranks("weights", tmp_path)
    for report in reports:
        assert report["refused"] and "ranks [1]" in report["refused"]


# -- segments launched with torchrun --------------------------------------------------


def _segment_cli(task_file: Path, out: Path, *extra: str, nproc: int = 2,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    args = [sys.executable, "-m", "flows.cli", "segment", str(task_file), "--output-dir",
            str(out), "--no-validation", "-q", "--nproc-per-node", str(nproc), *extra]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _summary(done: subprocess.CompletedProcess) -> dict:
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"one summary line (rank 0's) expected: {lines}"
    return json.loads(lines[0])


def _max_abs_difference(a: str, b: str) -> float:
    x, y = load_file(str(Path(a) / LORA)), load_file(str(Path(b) / LORA))
    assert sorted(x) == sorted(y)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Segments of 4 of 8 steps (micro-batches of 5, accumulation 2: shares of 3 and 2):
    two processes twice, one process, and each continued with the other world size."""
    root = tmp_path_factory.mktemp("distributed")
    task = make_task(**{"train_args.num_train_steps": 4})
    task_file = root / "task.json"
    task_file.write_text(task.model_dump_json())
    cache = str(root / "cache")
    one = SegmentOptions(cache_root=cache, validate=False)
    two_a = _summary(_segment_cli(task_file, root / "two_a", "--cache-dir", cache))
    two_b = _summary(_segment_cli(task_file, root / "two_b", "--cache-dir", cache))
    single = run_segment(task, str(root / "one"), one)
    two_then_one = run_segment(task, str(root / "two_then_one"),
                               SegmentOptions(cache_root=cache, validate=False,
                                              checkpoint=two_a["checkpoint"]))
    one_then_two = _summary(_segment_cli(task_file, root / "one_then_two", "--cache-dir", cache,
                                         "--checkpoint", single.checkpoint))
    one_then_one = run_segment(task, str(root / "one_then_one"),
                               SegmentOptions(cache_root=cache, validate=False,
                                              checkpoint=single.checkpoint))
    return {"two_a": two_a, "two_b": two_b, "single": single, "two_then_one": two_then_one,
            "one_then_two": one_then_two, "one_then_one": one_then_one}


@pytest.mark.slow
def test_two_runs_with_two_processes_are_identical_bit_for_bit(runs: dict) -> None:
    a, b = runs["two_a"], runs["two_b"]
    assert a["global_step"] == b["global_step"] == 4 and a["stopped_by"] == "steps"
    assert checkpoint_bytes(a["checkpoint"]) == checkpoint_bytes(b["checkpoint"])


@pytest.mark.slow
def test_a_checkpoint_from_two_processes_finishes_with_one_and_back(runs: dict) -> None:
    assert runs["two_then_one"].finished and runs["two_then_one"].global_step == 8
    assert runs["one_then_two"]["finished"] and runs["one_then_two"]["global_step"] == 8


@pytest.mark.slow
def test_two_processes_match_one_up_to_reduction_order(runs: dict) -> None:
    after_4 = _max_abs_difference(runs["two_a"]["checkpoint"], runs["single"].checkpoint)
    after_8 = _max_abs_difference(runs["two_then_one"].checkpoint,
                                  runs["one_then_one"].checkpoint)
    mixed = _max_abs_difference(runs["one_then_two"]["checkpoint"],
                                runs["one_then_one"].checkpoint)
    print(f"max abs LoRA difference, 2 vs 1 processes: {after_4:.3g} after 4 steps, "
          f"{after_8:.3g} after 4+4 (2 then 1), {mixed:.3g} after 4+4 (1 then 2)")
    assert after_4 < TOLERANCE and after_8 < TOLERANCE and mixed < TOLERANCE


@pytest.mark.slow
def test_the_manifest_records_the_world_size_for_information_only(runs: dict) -> None:
    manifest = json.loads((Path(runs["two_a"]["checkpoint"]) / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    single = json.loads((Path(runs["single"].checkpoint) / "manifest.json").read_text())
    assert "world_size" not in single  # one process: the manifest keeps its bytes


@pytest.mark.slow
def test_the_time_box_stops_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    steps = 5000  # far more than the budget allows
    task = make_task(**{"train_args.batch_size": 4, "train_args.gradient_accumulation_steps": 1,
                        "train_args.num_train_steps": steps, "train_args.max_train_steps": steps})
    task_file = tmp_path / "task.json"
    task_file.write_text(task.model_dump_json())
    done = _segment_cli(task_file, tmp_path / "out", "--no-cache", "--budget-seconds", "40")
    summary = _summary(done)
    assert summary["stopped_by"] == "budget" and 0 < summary["global_step"] < steps
    assert summary["seconds"] < 40
    for rank in (0, 1):  # each rank took the agreed stop, then both committed step N
        assert f"rank {rank} of 2 stops: budget" in done.stderr
    manifest = json.loads((tmp_path / "out" / "checkpoint" / "manifest.json").read_text())
    assert manifest["global_step"] == summary["global_step"]
