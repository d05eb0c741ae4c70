"""Overrides on the command line (``train_args.learning_rate=5e-5``), checked like the file.

Before, ``loraflow run``, ``segment`` and ``validate`` took a task file and nothing else: a
one-value change meant editing (or copying) the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.task.overrides import (
    apply_overrides,
    load_task_with_overrides,
    parse_value,
    validate_with_overrides,
)
from engine.task.validation import TaskValidationError

ROOT = Path(__file__).resolve().parents[3]
MINIMAL = {"model": {"name": "m"}, "dataset": {"name": "d"}, "validation": {}, "train_args": {}}


def problems_of(overrides: list[str], doc: object = MINIMAL) -> list[str]:
    with pytest.raises(TaskValidationError) as info:
        validate_with_overrides(doc, overrides)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(("raw", "value"), [
    ("5e-5", 5e-5), ("16", 16), ("true", True), ("null", None), ("[1, 2]", [1, 2]),
    ('"16"', "16"), ("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    ("", ""), ("NaN", "NaN"), ("a photo of sks", "a photo of sks"),
])
def test_values_are_json_else_the_string_itself(raw: str, value: object) -> None:
    assert parse_value(raw) == value


def test_merge_is_pure_and_creates_missing_or_null_sections() -> None:
    doc = {**MINIMAL, "lora": {"text_encoder": None, "target_modules": ["to_q", "to_k"]}}
    before = json.dumps(doc, sort_keys=True)
    merged = apply_overrides(doc, [
        "train_args.learning_rate=5e-5", "lora.rank=16", "lora.text_encoder.rank=2",
        "lora.target_modules.1=to_v", "output.lora_formats=[\"kohya\"]",
    ])
    assert json.dumps(doc, sort_keys=True) == before  # the input is not touched
    assert merged["train_args"]["learning_rate"] == 5e-5
    assert merged["lora"] == {"rank": 16, "text_encoder": {"rank": 2},
                              "target_modules": ["to_q", "to_v"]}
    assert merged["output"] == {"lora_formats": ["kohya"]}


def test_later_override_wins() -> None:
    merged = apply_overrides(MINIMAL, ["train_args.seed=1", "train_args.seed=2"])
    assert merged["train_args"]["seed"] == 2


def test_overrides_give_a_valid_task_with_their_values() -> None:
    task = validate_with_overrides(
        MINIMAL, ["train_args.learning_rate=5e-5", "lora.rank=16", "model.name=org/model"]
    )
    assert task.train_args.learning_rate == 5e-5
    assert task.lora.rank == 16 and task.model.name == "org/model"


def test_a_typo_in_a_key_gets_the_did_you_mean_hint_of_the_file() -> None:
    assert problems_of(["train_args.learnig_rate=1e-4"]) == [
        "/train_args/learnig_rate: unknown field; did you mean learning_rate? "
        "(override train_args.learnig_rate=1e-4)"
    ]
    (section,) = problems_of(["trian_args.learning_rate=1e-4"])
    assert section.startswith("/trian_args: unknown field; did you mean train_args?")


def test_a_bad_value_gets_the_message_of_the_file_and_names_the_override() -> None:
    assert problems_of(["train_args.learning_rate=-1", "lora.rank=0"]) == [
        "/lora/rank: must be >= 1, got 0 (override lora.rank=0)",
        "/train_args/learning_rate: must be > 0, got -1 (override train_args.learning_rate=-1)",
    ]
    (text,) = problems_of(["train_args.learning_rate=fast"])
    assert text.startswith('/train_args/learning_rate: must be a number, got string "fast"')


def test_cross_field_rules_see_the_overridden_values() -> None:
    (text,) = problems_of(["dataset.url=s3://bucket/data.zip"])
    assert text.startswith("/dataset: set exactly one of name, url and shards")
    assert text.endswith("(override dataset.url=s3://bucket/data.zip)")


@pytest.mark.parametrize(("override", "expected"), [
    ("lora", "(document): override 'lora' must look like KEY.PATH=VALUE"),
    ("a..b=1", "(document): override 'a..b=1' must look like KEY.PATH=VALUE"),
    ("model.name.x=1", "/model/name: is a string, not an object: cannot set 'x' in it"),
    ("lora.target_modules.5=x", "/lora/target_modules: is a list of 1 item(s); '5' is not an"),
])
def test_a_malformed_override_is_refused_by_pointer(override: str, expected: str) -> None:
    doc = {**MINIMAL, "lora": {"target_modules": ["to_q"]}}
    (text,) = problems_of([override], doc)
    assert text.startswith(expected)


def test_a_problem_of_the_file_is_not_blamed_on_an_override() -> None:
    doc = {**MINIMAL, "train_args": {"batch_size": 0}}
    assert problems_of(["train_args.learning_rate=1e-4"], doc) == [
        "/train_args/batch_size: must be >= 1, got 0"
    ]


def test_load_with_overrides_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(MINIMAL))
    assert load_task_with_overrides(str(path), ["lora.rank=16"]).lora.rank == 16
    assert load_task_with_overrides(str(path)).lora.rank != 16


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_validate_prints_the_task_with_the_overrides(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(MINIMAL))
    done = _cli("validate", str(path), "train_args.learning_rate=5e-5", "lora.rank=16")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["train_args"]["learning_rate"] == 5e-5 and printed["lora"]["rank"] == 16

    done = _cli("validate", str(path), "train_args.learnig_rate=5e-5")
    assert done.returncode == 2 and done.stdout == ""
    assert "did you mean learning_rate?" in done.stderr and "Traceback" not in done.stderr
