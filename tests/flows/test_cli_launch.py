"""``loraflow segment --nproc-per-node 2`` (flows/cli/launch.py) stopped by a signal, for real.

SIGTERM is what Prefect's runner and the OS send on a cancel, SIGINT what Ctrl-C sends
to the terminal's foreground process (the launcher: torchrun starts each rank in its own
session). Either, sent to the launcher alone while two gloo ranks train tiny-sd1, must
stop both ranks at the same step, commit rank 0's checkpoint and end the launcher with
the segment's signal outcome (exit code 5, ``stopped_by: signal``), leaving no rank
process behind; the checkpoint then resumes to the LoRA of a run never interrupted.

Each test waits on a condition (rank 0's first step line, the process's exit), each
with a deadline, and kills what it started if a deadline passes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.errors import ExitCode
from flows.cli.launch import child_argv, exit_code
from tests.support.engine import checkpoint_bytes, make_task

ROOT = Path(__file__).resolve().parents[2]
#: Far more steps than the few a test lets train before its signal, and few enough that
#: the uninterrupted run it is compared with stays short (~0.05 s a step here).
STEPS = 300
#: Longer than torchrun's own grace before SIGKILL (30 s) plus a slow commit.
EXIT_SECONDS = 120.0
START_SECONDS = 300.0  # two ranks start up on a shared 2-core machine

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="reads the rank processes from /proc (Linux)")


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it: its id and start time (so a reused id is not it)."""

    pid: int
    started: int


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()  # fields from the state on


def ranks_of(launcher: int) -> list[Proc]:
    """The launcher's child processes running ``flows.cli`` (torchrun's ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or int(fields[1]) != launcher:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"flows.cli" in cmdline:
            found.append(Proc(int(entry.name), int(fields[19])))
    return found


def running(proc: Proc) -> bool:
    """Whether ``proc`` still runs (a zombie has exited)."""
    fields = _stat(proc.pid)
    return fields is not None and int(fields[19]) == proc.started and fields[0] != "Z"


def steps_logged(out: Path) -> list[dict]:
    """Rank 0's metrics records (read once it has exited: the file is buffered)."""
    path = out / "metrics" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_task(folder: Path) -> Path:
    task = make_task(**{"train_args.batch_size": 4, "train_args.gradient_accumulation_steps": 1,
                        "train_args.num_train_steps": STEPS,
                        "train_args.max_train_steps": STEPS})
    path = folder / "task.json"
    path.write_text(task.model_dump_json())
    return path


@dataclass
class Launched:
    process: subprocess.Popen
    out: Path
    stdout: Path
    stderr: Path

    def wait_for(self, condition, what: str, seconds: float) -> None:  # noqa: ANN001
        deadline = time.monotonic() + seconds
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"the launcher exited ({self.process.returncode}) before "
                                     f"{what}:\n{self.stderr.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {seconds} s:\n"
                                     f"{self.stderr.read_text()[-4000:]}")
            time.sleep(0.05)  # polling the condition, not waiting for a guess

    def finish(self, seconds: float = EXIT_SECONDS) -> int:
        return self.process.wait(timeout=seconds)

    def kill_all(self) -> None:
        """Kill the launcher and its ranks if a test left them running (by their ids)."""
        if self.process.poll() is None:
            for rank in ranks_of(self.process.pid):
                os.kill(rank.pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(timeout=30)


def launch(task_file: Path, folder: Path, *extra: str) -> Launched:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LORAFLOW_QUIET"):
        env.pop(key, None)
    args = [sys.executable, "-m", "flows.cli", "segment", str(task_file), "--output-dir",
            str(out), "--no-validation", "--nproc-per-node", "2", *extra]
    stdout, stderr = folder / "stdout", folder / "stderr"
    with stdout.open("w") as so, stderr.open("w") as se:
        process = subprocess.Popen(args, stdout=so, stderr=se, cwd=ROOT, env=env)
    return Launched(process, out, stdout, stderr)


def summary_of(launched: Launched) -> dict:
    lines = launched.stdout.read_text().strip().splitlines()
    assert len(lines) == 1, f"one summary line (rank 0's) expected: {lines}"
    return json.loads(lines[0])


@dataclass
class Interrupted:
    code: int
    summary: dict
    stderr: str
    ranks: list[Proc]
    ranks_after: list[Proc]
    metrics: list[dict]
    manifest: dict


def interrupt(task_file: Path, folder: Path, signum: signal.Signals, cache: Path) -> Interrupted:
    """Launch 2 ranks, let them train a few steps, send ``signum`` to the launcher alone."""
    launched = launch(task_file, folder, "--cache-dir", str(cache))
    try:
        # rank 0's progress line after its first step (its metrics file is buffered)
        launched.wait_for(lambda: f"step 1/{STEPS} " in launched.stderr.read_text(),
                          "first step line from rank 0", START_SECONDS)
        ranks = ranks_of(launched.process.pid)
        launched.process.send_signal(signum)
        code = launched.finish()
        return Interrupted(
            code=code, summary=summary_of(launched), stderr=launched.stderr.read_text(),
            ranks=ranks, ranks_after=[r for r in ranks if running(r)],
            metrics=steps_logged(launched.out),
            manifest=json.loads((launched.out / "checkpoint" / "manifest.json").read_text()))
    finally:
        launched.kill_all()


def assert_stopped_together(run: Interrupted) -> None:
    assert run.code == ExitCode.INTERRUPTED, run.stderr[-4000:]
    assert len(run.ranks) == 2, f"two rank processes expected, saw {run.ranks}"
    assert run.ranks_after == [], f"rank processes left running: {run.ranks_after}"
    step = run.summary["global_step"]
    assert run.summary["stopped_by"] == "signal" and not run.summary["finished"]
    assert 1 <= step < STEPS
    # what rank 0 committed is the step it reported and the last step it logged; the
    # commit itself checked that both ranks were at that step with the same weights
    assert run.manifest["global_step"] == step == run.metrics[-1]["global_step"]
    assert run.manifest["world_size"] == 2
    for rank in (0, 1):
        assert f"rank {rank} of 2 stops: signal" in run.stderr
    assert run.stderr.count("stop requested (signal") == 2  # each rank once: no second
    assert "Traceback" not in run.stderr
    # the progress lines are rank 0's alone (rank 1 draws none), as for one process
    assert run.stderr.count(f"step 1/{STEPS} ") == 1


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("launch_sigterm")
    task_file = write_task(root)
    run = interrupt(task_file, root / "interrupted", signal.SIGTERM, root / "cache")
    return {"root": root, "task_file": task_file, "run": run}


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_ranks_at_one_committed_step(sigterm_run: dict,
                                                                         ) -> None:
    assert_stopped_together(sigterm_run["run"])


@pytest.mark.slow
def test_sigint_to_the_launcher_stops_both_ranks_at_one_committed_step(tmp_path: Path) -> None:
    run = interrupt(write_task(tmp_path), tmp_path / "interrupted", signal.SIGINT,
                    tmp_path / "cache")
    assert_stopped_together(run)


@pytest.mark.slow
def test_a_segment_stopped_by_sigterm_resumes_to_the_uninterrupted_lora(sigterm_run: dict,
                                                                        ) -> None:
    root, task_file = sigterm_run["root"], sigterm_run["task_file"]
    cache = str(root / "cache")
    interrupted = sigterm_run["run"].summary["checkpoint"]
    finishing = [launch(task_file, root / "resumed", "-q", "--cache-dir", cache,
                        "--checkpoint", interrupted),
                 launch(task_file, root / "whole", "-q", "--cache-dir", cache)]
    try:
        for launched in finishing:
            assert launched.finish(START_SECONDS) == ExitCode.OK, \
                launched.stderr.read_text()[-4000:]
    finally:
        for launched in finishing:
            launched.kill_all()
    resumed, whole = (summary_of(launched) for launched in finishing)
    assert resumed["finished"] and resumed["start_step"] == sigterm_run["run"].summary[
        "global_step"]
    assert whole["finished"] and whole["global_step"] == resumed["global_step"] == STEPS
    assert checkpoint_bytes(resumed["checkpoint"]) == checkpoint_bytes(whole["checkpoint"])


@pytest.mark.slow
def test_ranks_commit_and_exit_when_the_launcher_is_killed(tmp_path: Path) -> None:
    launched = launch(write_task(tmp_path), tmp_path / "killed", "--cache-dir",
                      str(tmp_path / "cache"))
    try:
        launched.wait_for(lambda: f"step 1/{STEPS} " in launched.stderr.read_text(),
                          "first step line from rank 0", START_SECONDS)
        ranks = ranks_of(launched.process.pid)
        launched.process.kill()  # kill -9: it passes nothing on
        launched.finish()
        deadline = time.monotonic() + EXIT_SECONDS
        while any(running(rank) for rank in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the ranks' exit, with a deadline
        left = [rank for rank in ranks if running(rank)]
        for rank in left:
            os.kill(rank.pid, signal.SIGKILL)
    finally:
        launched.kill_all()
    assert len(ranks) == 2 and left == [], f"orphaned ranks trained on: {left}"
    summary = summary_of(launched)  # rank 0 still had the launcher's stdout
    manifest = json.loads((launched.out / "checkpoint" / "manifest.json").read_text())
    assert summary["stopped_by"] == "signal" and 1 <= summary["global_step"] < STEPS
    assert manifest["global_step"] == summary["global_step"]


def catches_sigterm(proc: Proc) -> bool:
    """Whether the process has a SIGTERM handler (its ``SigCgt`` mask in /proc)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    raise AssertionError(f"no SigCgt line for process {proc.pid}")


@pytest.mark.slow
def test_sigterm_while_the_ranks_start_exits_143_with_nothing_committed(tmp_path: Path,
                                                                        ) -> None:
    launched = launch(write_task(tmp_path), tmp_path / "starting", "--cache-dir",
                      str(tmp_path / "cache"))
    try:
        launched.wait_for(lambda: len(ranks_of(launched.process.pid)) == 2,
                          "two rank processes", START_SECONDS)
        ranks = ranks_of(launched.process.pid)
        # the ranks are still importing: neither has its stop handler yet
        assert not any(catches_sigterm(rank) for rank in ranks)
        launched.process.send_signal(signal.SIGTERM)
        code = launched.finish()
        left = [rank for rank in ranks if running(rank)]
    finally:
        launched.kill_all()
    stderr = launched.stderr.read_text()
    assert code == 128 + signal.SIGTERM, stderr[-4000:]  # 143, as a shell reports one process
    assert left == [], f"rank processes left running: {left}"
    assert "while the ranks were starting: nothing trained or committed" in stderr
    assert "Traceback" not in stderr
    assert not (launched.out / "checkpoint").exists()
    assert launched.stdout.read_text() == ""  # no summary: no segment ran


def test_the_launchers_exit_code_is_the_first_failure_else_rank_zeros() -> None:
    assert exit_code([0, 0], None) == ExitCode.OK  # finished, even if a signal came late
    assert exit_code([5, 5], None) == ExitCode.INTERRUPTED
    assert exit_code([-9, 4], 1) == 4  # rank 1 failed first; rank 0 was then killed
    assert exit_code([-11, -15], 0) == ExitCode.FAILED  # killed by a signal: a failure
    # ended by the signal the launcher passed on, before handling it: 128 + its number
    assert exit_code([-15, -15], 0, {signal.SIGTERM}) == 143
    assert exit_code([-9, -15], 0, {signal.SIGTERM}) == ExitCode.FAILED  # not that one


def test_the_ranks_run_the_command_without_the_launch_option() -> None:
    argv = ["segment", "t.json", "--nproc-per-node", "2", "--output-dir", "o",
            "--nproc-per-node=3", "-q"]
    assert child_argv(argv) == ["segment", "t.json", "--output-dir", "o", "-q"]
