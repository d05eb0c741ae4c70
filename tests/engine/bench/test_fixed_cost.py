"""``loraflow bench --fixed-cost``: medians per phase and the table, without processes."""

from __future__ import annotations

from engine.bench.fixed_cost import PEER_TASK, medians, render_fixed_cost, segment_command
from engine.task.validation import validate_document
from flows.cli.main import build_parser


def test_medians_count_a_phase_a_process_skipped_as_zero():
    rows = [{"imports": 1.0, "save": 3.0}, {"imports": 2.0}, {"imports": 9.0, "save": 1.0}]
    assert medians(rows) == {"imports": 2.0, "save": 1.0}


def test_the_table_puts_the_totals_last_and_lists_every_variant():
    result = {"repeats": 3, "steps": 1, "threads": 1, "variants": {
        "cache": {"whole process": 10.0, "fixed cost": 9.0, "imports": 4.0},
        "no-cache": {"imports": 4.5, "whole process": 11.0, "fixed cost": 10.0}}}
    lines = render_fixed_cost(result).splitlines()
    assert lines[2] == "| phase | cache | no-cache |"
    assert lines[4] == "| imports | 4.000 s | 4.500 s |"
    assert lines[-2:] == ["| **fixed cost** | 9.000 s | 10.000 s |",
                          "| **whole process** | 10.000 s | 11.000 s |"]


def test_the_measured_work_is_a_valid_task_and_a_quiet_segment_without_validation():
    validate_document(PEER_TASK)
    args = segment_command("t.json", "out", cache_dir=None, steps=2)
    assert args[:2] == ["segment", "t.json"] and "--no-validation" in args
    assert "--no-cache" in args and "train_args.max_train_steps=2" in args


def test_bench_takes_fixed_cost_as_an_option():
    args = build_parser().parse_args(["bench", "--fixed-cost", "--repeats", "1"])
    assert args.fixed_cost and args.repeats == 1
