"""The pipeline on a real S3 server (SeaweedFS on loopback): checkpoints, cache, validation
images, metrics and the published LoRA all travel through s3://, never a shared disk.

1. ``loraflow run`` (a separate process, against the session's Prefect API) with output
   and cache on S3 publishes there, and its LoRA is bit for bit the engine's local
   single-process one.
2. Two "workers" (separate processes with separate local data folders) take turns on the
   segments of one run, the second resuming from the checkpoint the first left on S3:
   the result equals the single-process run. (Segments handed to served workers by a
   running flow: tests/flows/test_flow_server.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load as load_tensors

from engine.store import storage
from tests.support.flow import assert_same_lora, flow_task, lora_bytes, subprocess_env

pytest_plugins = ["tests.support.s3_server", "tests.support.flow_fixtures"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "task.json"
    path.write_text(flow_task().model_dump_json(exclude_unset=True))
    return path


def _loraflow(*args: str, env: dict[str, str], timeout: float = 240) -> str:
    """Run the ``loraflow`` CLI in a new process; return its stdout (fail with its stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True,
        text=True, timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"loraflow {args[0]} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def test_loraflow_run_publishes_on_s3(
    prefect_api: str, s3_prefix: str, task_file: Path, reference_run: dict[str, bytes],
) -> None:
    out, cache = f"{s3_prefix}/run", f"{s3_prefix}/cache"
    stdout = _loraflow(
        "run", str(task_file), "--output-dir", out, "--cache-dir", cache,
        env=subprocess_env(PREFECT_API_URL=prefect_api),
    )
    assert f"LoRA published to {out}/lora" in stdout

    final = f"{out}/segments/0002/checkpoint"
    assert_same_lora(lora_bytes(final), reference_run["lora"])
    published = storage.read_bytes(f"{out}/lora/pytorch_lora_weights.safetensors")
    expected = load_tensors(reference_run["lora"])
    got = load_tensors(published)  # same tensors; the file adds card metadata
    assert got.keys() == expected.keys()
    assert all(got[k].equal(expected[k]) for k in expected)

    for name in ("README.md", "task.json", "run_summary.json", "metrics.jsonl",
                 "validation/00.png"):
        assert storage.exists(f"{out}/lora/{name}"), name
    assert storage.read_bytes(f"{out}/validation/00.png")[:4] == b"\x89PNG"
    metrics = storage.read_bytes(f"{out}/lora/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["global_step"] for line in metrics] == [1, 2, 3, 4, 5, 6]
    assert storage.list_dirs(cache), "the latent / caption cache lives on S3 too"
    summary = json.loads(storage.read_bytes(f"{out}/lora/run_summary.json"))
    assert summary["checkpoint"] == "segments/0002/checkpoint"  # published: relative to out


def test_two_workers_take_turns_through_s3(
    s3_prefix: str, task_file: Path, tmp_path: Path, reference_run: dict[str, bytes],
) -> None:
    """Segment 0 on worker A, segment 1 on worker B; only S3 connects them.

    Two segments of 3 steps instead of the flow's three of 2 (one process start less):
    where a run is cut into segments does not change its result, so the yardstick is
    the same single-process run.
    """
    out, cache = f"{s3_prefix}/turns", f"{s3_prefix}/cache"
    task_file.write_text(
        flow_task(**{"train_args.num_train_steps": 3}).model_dump_json(exclude_unset=True)
    )
    workers = {"A": tmp_path / "worker-a", "B": tmp_path / "worker-b"}
    checkpoint = None
    results = []
    for index, worker in enumerate("AB"):
        args = ["segment", str(task_file), "--output-dir", f"{out}/segments/{index:04d}",
                "--cache-dir", cache, "--data-dir", str(workers[worker] / "datasets"),
                "--no-validation"]
        if checkpoint:
            args += ["--checkpoint", checkpoint]
        stdout = _loraflow(*args, env=subprocess_env())
        result = json.loads(stdout.strip().splitlines()[-1])
        results.append(result)
        checkpoint = result["checkpoint"]

    assert [(r["start_step"], r["global_step"]) for r in results] == [(0, 3), (3, 6)]
    assert results[-1]["finished"] and checkpoint.startswith("s3://")
    assert all((w / "datasets").is_dir() for w in workers.values())  # each prepared its own
    assert_same_lora(lora_bytes(checkpoint), reference_run["lora"])
    optimizer = storage.read_bytes(storage.join(checkpoint, "optimizer.safetensors"))
    assert optimizer == reference_run["optimizer"]
