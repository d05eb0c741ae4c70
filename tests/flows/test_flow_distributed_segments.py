"""The finetune flow with ``processes_per_segment``: each segment trained by 2 gloo
processes (``loraflow segment --nproc-per-node 2``) started by the segment task.

The flow runs for real on the tiny task (6 steps in 3 segments of 2): two 2-process runs
give the same LoRA bit for bit, and one process gives it up to the order of the float
additions (docs/distributed.md); the run summary says how many processes trained each
segment, and the ranks' log lines reach the segment's task run. The plumbing of the
child (the stop of its whole process group, the request's shape, bad values) is checked
without training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load

from engine.errors import BudgetTooShortError, ConfigurationError, ExitCode, LoraflowError
from engine.store.commit import read_manifest
from tasks.payloads import DatasetSummary, SegmentRequest
from tasks.segment_processes import (
    SegmentProcessesFailed,
    checked_processes,
    child_environment,
    failure,
    wait_for_exit,
)
from tests.support.flow import (
    assert_same_lora,
    flow_run_id,
    flow_task,
    lora_bytes,
    run_finetune,
    task_runs,
    wait_for,
)

pytest_plugins = ["tests.support.flow_fixtures"]

#: 2 processes vs 1 may differ only by float reduction order (~1e-7 measured on tiny-sd1,
#: docs/distributed.md); the same bound as tests/engine/train/test_distributed.py.
TOLERANCE = 1e-5


def max_abs_difference(a: bytes, b: bytes) -> float:
    x, y = load(a), load(b)
    assert sorted(x) == sorted(y)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


@pytest.fixture(scope="module")
def runs(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny flow three times on one cache: one process, then 2 processes twice."""
    assert os.environ["OMP_NUM_THREADS"] == "1"  # the children's thread count (conftest)
    root = tmp_path_factory.mktemp("distributed-flow")
    cache = str(root / "cache")
    _, one = run_finetune(flow_task(), str(root / "one"), cache_dir=cache)
    state_a, two_a = run_finetune(flow_task(), str(root / "two_a"), cache_dir=cache,
                                  processes_per_segment=2)
    _, two_b = run_finetune(flow_task(), str(root / "two_b"), cache_dir=cache,
                            processes_per_segment=2)
    return {"one": one, "two_a": two_a, "two_b": two_b, "state_a": state_a}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_flow_runs_give_the_same_lora_bit_for_bit(runs: dict) -> None:
    a, b = runs["two_a"], runs["two_b"]
    assert a["global_step"] == b["global_step"] == a["total_steps"] == 6
    assert a["segments"] == 3
    assert_same_lora(lora_bytes(b["checkpoint"]), lora_bytes(a["checkpoint"]))
    published_a, published_b = (load(Path(r["lora"]["diffusers"]).read_bytes()) for r in (a, b))
    assert published_a.keys() == published_b.keys()
    assert all(published_a[k].equal(published_b[k]) for k in published_a)  # the tensors


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_match_one_up_to_reduction_order(runs: dict) -> None:
    one, two = runs["one"], runs["two_a"]
    assert one["global_step"] == two["global_step"]
    difference = max_abs_difference(lora_bytes(two["checkpoint"]), lora_bytes(one["checkpoint"]))
    print(f"flow, 3 segments of 2 steps, 2 processes vs 1: max abs difference {difference:.3g}")
    assert difference < TOLERANCE


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_run_summary_records_how_many_processes_trained_each_segment(runs: dict) -> None:
    assert [s["world_size"] for s in runs["one"]["segment_results"]] == [1, 1, 1]
    assert [s["world_size"] for s in runs["two_a"]["segment_results"]] == [2, 2, 2]
    assert [s["start_step"] for s in runs["two_a"]["segment_results"]] == [0, 2, 4]
    published = json.loads(Path(runs["two_a"]["lora"]["run_summary"]).read_text())
    assert [s["world_size"] for s in published["segment_results"]] == [2, 2, 2]
    assert read_manifest(runs["two_a"]["checkpoint"]).meta.get("world_size") == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_ranks_log_lines_reach_the_segments_task_run(runs: dict) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    segment = {r.name: r for r in task_runs(flow_run_id(runs["state_a"]))}["segment-1 steps 2-4"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[segment.id])),
            sort=LogSort.TIMESTAMP_ASC, limit=200, offset=0,
        )
    messages = [log.message for log in logs]
    assert any("[segment]" in m and "committed" in m and "at step 4" in m
               for m in messages), messages


# -- the plumbing, without training ---------------------------------------------------


def test_one_process_leaves_the_request_as_it_always_was() -> None:
    assert checked_processes(None) is None and checked_processes(1) is None
    assert checked_processes(4) == 4
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ConfigurationError, match="processes_per_segment"):
            checked_processes(bad)  # type: ignore[arg-type]
    dataset = DatasetSummary(address="data/x", count=10, content_hash="abc", skipped=0,
                             skipped_examples=[], empty_captions=0)
    request = SegmentRequest(task=flow_task(), index=0, output_dir="runs/x", checkpoint=None,
                             dataset=dataset)
    assert "processes_per_segment" not in request.model_dump(mode="json")
    assert "processes_per_segment" not in request.model_dump_json()
    two = request.model_copy(update={"processes_per_segment": 2})
    assert SegmentRequest.model_validate(two.model_dump(mode="json")) == two


def test_a_childs_exit_code_keeps_its_meaning() -> None:
    bad = failure(ExitCode.BAD_INPUT, ["... INFO x: starting", "error: no such dataset"])
    assert isinstance(bad, LoraflowError) and bad.exit_code == ExitCode.BAD_INPUT
    assert str(bad) == "no such dataset"  # not retried: the same input fails again
    assert isinstance(failure(ExitCode.BUDGET_TOO_SHORT, ["error: 1 s"]), BudgetTooShortError)
    crashed = failure(-9, ["... INFO x: step 3"])
    assert isinstance(crashed, SegmentProcessesFailed) and "code -9" in str(crashed)


def test_the_child_starts_its_own_world() -> None:
    os.environ["WORLD_SIZE"] = "4"
    try:
        env = child_environment(12.5)
    finally:
        del os.environ["WORLD_SIZE"]
    assert "WORLD_SIZE" not in env and env["LORAFLOW_SEGMENT_STARTED_AT"] == "12.5"


#: A child that starts a grandchild in its group, then on SIGTERM commits (writes a file)
#: and exits 5, as the ranks do.
CHILD = """
import pathlib, signal, subprocess, sys, time
out = pathlib.Path(sys.argv[1])
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
def stop(*_):
    out.joinpath("committed").write_text("yes")
    sys.exit(5)
signal.signal(signal.SIGTERM, stop)
out.joinpath("grandchild").write_text(str(grandchild.pid))
while True:
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone


@pytest.mark.timeout(60)
def test_a_timeout_while_waiting_stops_the_whole_child_group_first(tmp_path: Path) -> None:
    """Prefect's timeout (an exception raised into the waiting thread, here by SIGALRM)
    sends SIGTERM to the group: the child commits and exits 5, its own child is gone."""
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                               start_new_session=True)
    wait_for(lambda: (tmp_path / "grandchild").exists(), 30, "the child to start", process)
    grandchild = int((tmp_path / "grandchild").read_text())

    def time_out(*_: object) -> None:
        raise TimeoutError("backstop")

    previous = signal.signal(signal.SIGALRM, time_out)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(TimeoutError, match="backstop"):
            wait_for_exit(process, poll=0.05)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert process.returncode == ExitCode.INTERRUPTED
    assert (tmp_path / "committed").read_text() == "yes"
    wait_for(lambda: not alive(grandchild), 10, "the grandchild to be gone")


def test_loraflow_run_takes_the_number_of_processes_per_segment() -> None:
    from flows.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["run", "task.json", "--output-dir", "x",
                              "--processes-per-segment", "2"])
    assert args.processes_per_segment == 2
    assert parser.parse_args(["run", "task.json", "--output-dir", "x"]).processes_per_segment \
        is None
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "task.json", "--output-dir", "x", "--processes-per-segment", "0"])
