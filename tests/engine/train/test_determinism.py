"""Kernel switches per ``train_args.deterministic`` and the thread-count record on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.store.commit import read_checkpoint
from engine.train.determinism import (
    apply_kernel_mode,
    current_switches,
    kernel_mode,
    resume_warnings,
    runtime_record,
    set_switches,
)
from engine.train.segment import SegmentOptions, run_segment
from tests.support.engine import make_task


def test_deterministic_mode_forbids_autotuning_tf32_and_cudnn_attention() -> None:
    mode = kernel_mode(True)
    assert mode.deterministic_algorithms and mode.cudnn_deterministic
    assert not (mode.cudnn_benchmark or mode.tf32 or mode.cudnn_sdp)
    fastest = kernel_mode(False)
    assert fastest.cudnn_benchmark and fastest.tf32 and not fastest.deterministic_algorithms


def test_on_a_cpu_nothing_is_switched() -> None:
    before = current_switches()
    assert apply_kernel_mode(True, torch.device("cpu")) is None
    assert current_switches() == before


def test_switches_are_set_and_read_back() -> None:
    before = current_switches()
    try:
        set_switches(kernel_mode(True))
        assert torch.are_deterministic_algorithms_enabled()
        assert current_switches().deterministic_algorithms
    finally:
        set_switches(before)
    assert current_switches() == before


def test_another_thread_count_is_named_in_the_warning() -> None:
    saved = runtime_record(torch.device("cpu")) | {"torch_threads": torch.get_num_threads() + 1}
    now = torch.get_num_threads()
    [message] = resume_warnings({"runtime": saved}, torch.device("cpu"))
    assert message.startswith(f"checkpoint trained with {now + 1} threads, resuming with "
                              f"{now} thread{'s' if now != 1 else ''}: the result will not "
                              "be bit-identical to one run")


def test_same_runtime_or_no_record_gives_no_warning() -> None:
    cpu = torch.device("cpu")
    assert resume_warnings({"runtime": runtime_record(cpu)}, cpu) == []
    assert resume_warnings({}, cpu) == []


def test_another_device_type_or_torch_is_named() -> None:
    cpu = torch.device("cpu")
    saved = runtime_record(cpu) | {"device_type": "cuda", "torch": "0.0.1"}
    messages = resume_warnings({"runtime": saved}, cpu)
    assert messages[0].startswith("checkpoint trained on cuda, resuming on cpu")
    assert "torch 0.0.1" in messages[1]


def test_a_resume_on_another_thread_count_says_so_in_the_segment_result(tmp_path: Path) -> None:
    task = make_task(**{"train_args.num_train_steps": 1, "train_args.max_train_steps": 2})
    threads = torch.get_num_threads()
    first = run_segment(task, str(tmp_path / "a"), SegmentOptions(validate=False))
    assert read_checkpoint(first.checkpoint).meta["runtime"]["torch_threads"] == threads
    assert first.warnings == []
    torch.set_num_threads(threads + 1)
    try:
        second = run_segment(task, str(tmp_path / "b"),
                             SegmentOptions(checkpoint=first.checkpoint, validate=False))
    finally:
        torch.set_num_threads(threads)
    assert second.finished
    assert any(f"trained with {threads} thread" in w and "not be bit-identical" in w
               for w in second.warnings)
