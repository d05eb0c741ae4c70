"""The ``loraflow`` command a new user meets: ``--version``, help with examples and exit
codes, a segment that shows its progress, and overrides on the command line.

Before: ``loraflow --version`` was an error; no help text had an example or said what
the exit codes mean; ``loraflow segment`` printed nothing while it trained; a one-value
change meant editing the task file.
"""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from engine.errors import ExitCode
from flows.cli import build_parser, main
from flows.cli.train import describe
from tests.support.engine import BASE_TASK

pytestmark = pytest.mark.timeout(300)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"loraflow {version('loraflow')}"


def test_top_level_help_lists_every_exit_code_and_an_example() -> None:
    text = build_parser().format_help()
    codes = {v for k, v in vars(ExitCode).items() if not k.startswith("_")}
    listed = {int(line.split()[0]) for line in text.split("exit codes:")[1].splitlines()
              if line.strip()[:1].isdigit()}
    assert codes <= listed, codes - listed
    assert "bad input" in text and "loraflow run examples/quickstart.json" in text


def test_every_command_help_has_an_example_of_itself() -> None:
    for name, parser in _subcommands().items():
        text = parser.format_help()
        assert "example:" in text, name
        assert f"loraflow {name}" in text.split("example:")[1], name


def test_overrides_may_come_before_or_after_the_options() -> None:
    from flows.cli.main import parse_arguments

    args = parse_arguments(build_parser(), ["run", "t.json", "lora.rank=16", "--output-dir",
                                            "runs/x", "train_args.seed=3"])
    assert args.overrides == ["lora.rank=16", "train_args.seed=3"]
    with pytest.raises(SystemExit):
        parse_arguments(build_parser(), ["schema", "lora.rank=16"])  # takes no overrides


def test_the_run_summary_lists_the_overrides() -> None:
    summary = {"lora": {"lora_dir": "runs/x/lora"}, "validation": [], "global_step": 6,
               "segments": 3, "checkpoint": "c", "overrides": ["lora.rank=16"]}
    assert "  overrides  lora.rank=16" in describe(summary).splitlines()
    assert "overrides" not in describe({**summary, "overrides": []})


@pytest.fixture
def task_file(tmp_path: Path) -> Iterator[Path]:
    """The tiny task as a file; the signal handlers ``segment`` installs are undone."""
    path = tmp_path / "task.json"
    path.write_text(json.dumps(BASE_TASK))
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield path
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_segment_shows_progress_on_stderr_and_the_overrides_in_its_summary(
    task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    override = "train_args.num_train_steps=2"
    code = main(["segment", str(task_file), override, "--output-dir", str(tmp_path / "s0"),
                 "--no-validation", "--cache-dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["global_step"] == 2 and summary["overrides"] == [override]
    progress = [line for line in err.splitlines() if line.startswith("step ")]
    assert progress and progress[-1].startswith("step 2/8 (25%) loss ")
    assert " lr " in progress[-1] and "samples/s" in progress[-1]

    code = main(["segment", str(task_file), override, "--quiet", "--no-validation",
                 "--output-dir", str(tmp_path / "s1"), "--cache-dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "samples/s" not in err
    assert "overrides" in json.loads(out.strip().splitlines()[-1])


def test_tiny_model_writes_the_quickstart_base_the_card_names(tmp_path: Path) -> None:
    # the published card of a tiny-shapes LoRA says `loraflow tiny-model tiny-shapes ./...`
    assert main(["tiny-model", "tiny-shapes", str(tmp_path / "tiny-shapes")]) == 0
    assert (tmp_path / "tiny-shapes" / "model_index.json").is_file()
    assert (tmp_path / "tiny-shapes" / "unet").is_dir()


def test_the_run_summary_shows_what_an_epoch_trained() -> None:
    epoch = {"images": 5, "images_per_epoch": 7, "batches_per_epoch": 4, "batch_size": 2,
             "buckets": [{"bucket": "48x80", "images": 2, "uses": 4, "batches": 2},
                         {"bucket": "64x64", "images": 3, "uses": 3, "batches": 2}],
             "subsets": [{"name": "a", "images": 3, "repeats": 1, "uses": 3},
                         {"name": "b", "images": 2, "repeats": 2, "uses": 4}],
             "skipped": 1}
    summary = {"lora": {"lora_dir": "runs/x/lora"}, "validation": [], "global_step": 6,
               "segments": 3, "checkpoint": "c", "dataset": {"count": 5, "epoch": epoch}}
    lines = describe(summary).splitlines()
    assert "data: 5 images, 7 uses per epoch in 4 batches of up to 2; 1 file(s) skipped" in lines
    assert "  bucket     48x80: 2 images, 4 uses, 2 batches" in lines
    assert "  subset b: 2 images x2 = 4 uses" in lines


def test_segment_shows_the_data_of_an_epoch_on_stderr(
    task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["segment", str(task_file), "train_args.num_train_steps=1", "--no-validation",
                 "--output-dir", str(tmp_path / "s0"), "--cache-dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])  # stdout stays one JSON record
    images = record["data"]["images"]
    assert f"data: {images} images, {images} uses per epoch" in err
    assert "  bucket     64x64:" in err
