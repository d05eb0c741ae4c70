"""``loraflow verify``: a verdict on stdout and an exit code a network can act on: 0 for an
honest segment, 6 for one whose replay differs from its trail, 2 (one ``error:`` line,
no traceback) for a checkpoint or trail that cannot be read."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from engine.errors import ExitCode
from engine.lora.weights import LORA_FILE
from engine.store.commit import read_checkpoint
from flows.cli import main
from tests.support.engine import BASE_TASK, make_task, run_chain
from tests.support.forgery import (
    copy_segment,
    nudged_lora,
    recommit,
    state_digests,
    with_last_point,
)

pytestmark = pytest.mark.timeout(600)

CHANGES = {"num_train_steps": 8, "max_train_steps": 8, "checkpointing_steps": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("verify-cli")
    document = copy.deepcopy(BASE_TASK)
    document["train_args"].update(CHANGES)
    task_file = root / "task.json"
    task_file.write_text(json.dumps(document))
    task = make_task(**{f"train_args.{k}": v for k, v in CHANGES.items()})
    (result,) = run_chain(task, root)
    return {"task_file": str(task_file), "b": result.checkpoint, "cache": str(root / "cache"),
            "root": str(root)}


def _verify(run, b: str | Path, *extra: str) -> int:
    return main(["verify", "--task", run["task_file"], "--checkpoint-out", str(b),
                 "--cache-dir", run["cache"], "--seed", "3", *extra])


def test_an_honest_segment_exits_0_with_pass(run, capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(run, run["b"]) == ExitCode.OK
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "PASS"
    assert "replayed 2 in windows" in out[1] and "cost 0.250" in out[1]
    assert "sampling seed 3" in out[1]


def test_a_consistently_forged_weight_exits_6_naming_the_step(
        run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = copy_segment(Path(run["b"]).parent, tmp_path / "forged") / "checkpoint"
    loaded = read_checkpoint(str(b))
    recommit(b, files={LORA_FILE: nudged_lora(loaded.files[LORA_FILE])})
    task = make_task(**{f"train_args.{k}": v for k, v in CHANGES.items()})
    last = loaded.manifest.meta["digest_trail"]["points"][-1]
    recommit(b, meta=with_last_point(loaded.manifest.meta, state_digests(task, b),
                                     last["loss"]))
    assert _verify(run, b) == ExitCode.NOT_VERIFIED == 6
    assert capsys.readouterr().out.startswith("FAIL: step 8: weights of the replay from step 7")


def test_a_hand_edited_manifest_is_one_error_line_with_exit_2(
        run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = copy_segment(Path(run["b"]).parent, tmp_path / "edited") / "checkpoint"
    manifest = b / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"every": 1', '"every": 2'))
    assert _verify(run, b) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "error: checkpoint at" in err and "manifest_sha256 mismatch" in err
    assert "Traceback" not in err


def test_a_sample_outside_0_to_1_is_refused_by_the_parser(
        run, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        _verify(run, run["b"], "--sample", "0")
    assert done.value.code == 2
    assert "--sample: must be a number in (0, 1]" in capsys.readouterr().err
