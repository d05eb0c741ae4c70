"""The task definition: one typed source, Crynux-compatible, every problem reported clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.task.definition import CURRENT_VERSION, KNOWN_VERSIONS
from engine.task.migration import MIGRATIONS, UnknownVersionError, migrate
from engine.task.schema import MARKDOWN_PATH, SCHEMA_PATH, render_markdown, render_schema
from engine.task.validation import TaskValidationError, load_task, parse_task, validate_document

ROOT = Path(__file__).resolve().parents[3]
CRYNUX = Path(__file__).resolve().parents[2] / "data" / "crynux"
CRYNUX_SCHEMA = json.loads((CRYNUX / "crynux-finetune-lora-task.schema.json").read_text())
MINIMAL = {"model": {"name": "m"}, "dataset": {"name": "d"}, "validation": {}, "train_args": {}}


def problems_of(doc: object) -> list[str]:
    with pytest.raises(TaskValidationError) as info:
        validate_document(doc)
    return [str(p) for p in info.value.problems]


# -- one source of truth ------------------------------------------------------------------


def test_committed_schema_is_what_the_model_generates() -> None:
    assert SCHEMA_PATH.read_text() == render_schema(), "run: python -m engine.task.schema"


def test_committed_field_reference_is_what_the_model_generates() -> None:
    assert MARKDOWN_PATH.read_text() == render_markdown(), "run: python -m engine.task.schema"


def test_schema_is_valid_draft_2020_12() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")


# -- Crynux compatibility -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["crynux-minimal.json", "crynux-sd15-example.json"])
def test_crynux_examples_validate_with_the_same_values(name: str) -> None:
    doc = json.loads((CRYNUX / name).read_text())
    jsonschema.validate(doc, CRYNUX_SCHEMA)
    task = load_task(str(CRYNUX / name))
    dumped = task.model_dump()
    for section, values in doc.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert dumped[section][key] == value, f"/{section}/{key}"
        else:
            assert dumped[section] == values


def _crynux_defaults(schema: dict, node: dict) -> dict:
    out = {}
    for key, prop in node.get("properties", {}).items():
        if "default" in prop:
            out[key] = prop["default"]
    return out


def test_defaults_match_crynux_defaults() -> None:
    task = validate_document(MINIMAL)
    defs = CRYNUX_SCHEMA["$defs"]
    sections = {
        "train_args": "TrainArgs", "lora": "LoraArgs", "transforms": "TransformArgs",
        "validation": "ValidationArgs", "dataset": "DatasetArgs", "model": "ModelArgs",
    }
    dumped = task.model_dump()
    for section, def_name in sections.items():
        for key, default in _crynux_defaults(CRYNUX_SCHEMA, defs[def_name]).items():
            if key in MINIMAL.get(section, {}):
                continue  # given in the document, not defaulted
            assert dumped[section][key] == default, f"/{section}/{key}"
    for key in ("dataloader_num_workers", "mixed_precision", "seed", "checkpoint"):
        assert dumped[key] == CRYNUX_SCHEMA["properties"][key]["default"]
    assert task.lora_alpha == task.lora.rank  # alpha = rank, as Crynux does


def test_every_example_in_the_repo_validates() -> None:
    examples = sorted((ROOT / "examples").glob("*.json"))
    assert len(examples) >= 4
    for path in examples:
        load_task(str(path))


sensible_crynux_task = st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries(
            {"name": st.sampled_from(["runwayml/stable-diffusion-v1-5", "./models/sd"])},
            optional={"variant": st.sampled_from([None, "fp16"]), "revision": st.just("main")},
        ),
        "dataset": st.one_of(
            st.fixed_dictionaries({"name": st.just("lambdalabs/naruto-blip-captions")}),
            st.fixed_dictionaries({"url": st.just("https://example.org/d.zip")}),
        ),
        "validation": st.fixed_dictionaries(
            {}, optional={"prompt": st.one_of(st.none(), st.just("a cat")),
                          "num_images": st.integers(1, 10)}
        ),
        "train_args": st.fixed_dictionaries(
            {},
            optional={
                "learning_rate": st.floats(1e-6, 1e-2),
                "batch_size": st.integers(1, 64),
                "gradient_accumulation_steps": st.integers(1, 8),
                "prediction_type": st.sampled_from([None, "epsilon", "v_prediction"]),
                "max_grad_norm": st.floats(0.1, 10),
                "num_train_epochs": st.just(1),
                "max_train_epochs": st.integers(1, 5),
                "scale_lr": st.booleans(),
                "resolution": st.sampled_from([256, 512, 768, 1024]),
                "noise_offset": st.floats(0, 0.2),
                "snr_gamma": st.one_of(st.none(), st.floats(1, 10)),
                "lr_scheduler": st.fixed_dictionaries(
                    {}, optional={"lr_scheduler": st.sampled_from(
                        ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                         "constant_with_warmup"])}
                ),
            },
        ),
        "lora": st.fixed_dictionaries(
            {}, optional={"rank": st.integers(1, 128),
                          "init_lora_weights": st.sampled_from([True, False, "gaussian"]),
                          "target_modules": st.one_of(st.none(), st.just(["to_q", "to_v"]),
                                                      st.just(r".*attn.*\.to_[qkv]"))}
        ),
        "mixed_precision": st.sampled_from(["no", "fp16", "bf16"]),
        "seed": st.integers(0, 2**31),
        "version": st.sampled_from(list(KNOWN_VERSIONS)),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sensible_crynux_task)
def test_sensible_crynux_documents_are_accepted_with_their_values(doc: dict) -> None:
    jsonschema.validate(doc, CRYNUX_SCHEMA)
    task = validate_document(doc)
    dumped = task.model_dump()
    for key, value in doc["train_args"].items():
        if key != "lr_scheduler":
            assert dumped["train_args"][key] == value
    assert dumped["seed"] == doc["seed"]
    assert task.version == CURRENT_VERSION


# -- clear errors -------------------------------------------------------------------------


def test_unknown_key_is_refused_with_a_suggestion() -> None:
    doc = {**MINIMAL, "train_args": {"learnig_rate": 1e-4}}
    assert problems_of(doc) == [
        "/train_args/learnig_rate: unknown field; did you mean learning_rate?"
    ]


def test_all_problems_are_reported_at_once_with_pointers() -> None:
    doc = {
        "model": {"name": ""},
        "dataset": {"name": "d"},
        "validation": {"num_images": 11},
        "train_args": {
            "learning_rate": -1, "batch_size": "4", "lr_scheduler": {"lr_scheduler": "cos"}
        },
        "lora": {"rank": 0},
    }
    problems = problems_of(doc)
    assert "/train_args/learning_rate: must be > 0, got -1" in problems
    assert "/train_args/batch_size: must be an integer, got string \"4\"" in problems
    assert "/model/name: must not be empty" in problems
    assert "/validation/num_images: must be <= 10, got 11" in problems
    assert "/lora/rank: must be >= 1, got 0" in problems
    scheduler = "/train_args/lr_scheduler/lr_scheduler: must be one of"
    assert any(p.startswith(scheduler) for p in problems)


def test_missing_required_sections_are_named() -> None:
    assert problems_of({"model": {"name": "m"}}) == [
        "/dataset: required field is missing",
        "/validation: required field is missing",
        "/train_args: required field is missing",
    ]


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {"dataset": {"name": "d", "url": "https://x/y.zip"}},
            "/dataset: set exactly one of name, url and shards; name and url are set",
        ),
        ({"dataset": {}}, "/dataset: set exactly one of name, url and shards; none is set"),
        (
            {"train_args": {"num_train_steps": 10, "max_train_steps": 5}},
            "/train_args/num_train_steps: must be <= max_train_steps (5), got 10",
        ),
        (
            {"train_args": {"resolution": 100}},
            "/train_args/resolution: must be a positive multiple of 8",
        ),
        (
            {"train_args": {"max_train_steps": 100, "lr_scheduler": {"lr_scheduler": "cosine"}}},
            "/train_args/lr_scheduler/lr_warmup_steps: warmup (500) is longer",
        ),
        (
            {"lora": {"target_modules": "to_q("}},
            "/lora/target_modules: not a valid regular expression",
        ),
        ({"lora": {"init_lora_weights": "loftq"}}, "/lora/init_lora_weights: 'loftq'"),
        (
            {"model": {"name": "v1-5-pruned.ckpt"}},
            "/model/name: single-file checkpoints are not supported",
        ),
        ({"dataset": {"url": "not a url"}}, "/dataset/url: must be a URL"),
        ({"validation": {"prompt": " "}}, "/validation/prompt: must not be empty"),
        (
            {"dataset": {"name": "d", "caption_column": "image"}},
            "/dataset/caption_column: must differ from image_column",
        ),
    ],
)
def test_cross_field_rules(changes: dict, expected: str) -> None:
    problems = problems_of({**MINIMAL, **changes})
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "(document): empty document"),
        ("{", "(document): not valid JSON"),
        ("[1, 2]", "(document): must be a JSON object, got array"),
        ('{"seed": NaN}', "(document): NaN is not valid JSON"),
        ('{"seed": Infinity}', "(document): Infinity is not valid JSON"),
        (
            '{"train_args": {"learning_rate": 1e400}}',
            "/train_args/learning_rate: number out of range",
        ),
        ('{"a": 1, "a": 2}', "(document): duplicate key 'a'"),
        ("[" * 100_000 + "]" * 100_000, "(document): document is nested too deeply"),
        ('{"version": "9.9.9"}', "/version: unknown task format version '9.9.9'"),
    ],
    ids=[
        "empty", "truncated", "array", "nan", "infinity", "overflow", "duplicate", "deep",
        "version",
    ],
)
def test_malformed_text_gives_one_clear_problem(text: str, expected: str) -> None:
    with pytest.raises(TaskValidationError) as info:
        parse_task(text)
    assert str(info.value.problems[0]).startswith(expected)


def test_missing_file_is_a_clear_problem(tmp_path: Path) -> None:
    with pytest.raises(TaskValidationError, match="file not found"):
        load_task(str(tmp_path / "nope.json"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
paths = st.lists(
    st.sampled_from(["model", "dataset", "validation", "train_args", "lora", "transforms",
                     "lr_scheduler", "adam_args", "name", "url", "rank", "seed", "resolution",
                     "learning_rate", "batch_size", "target_modules", "version", "bogus"]),
    min_size=1, max_size=3,
)


def _mutate(doc: dict, path: list[str], value: object) -> dict:
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return doc


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(paths, json_values), min_size=1, max_size=4))
def test_mutated_documents_never_raise_anything_but_a_clear_error(mutations: list) -> None:
    doc = json.loads((CRYNUX / "crynux-sd15-example.json").read_text())
    for path, value in mutations:
        doc = _mutate(doc, path, value)
    try:
        validate_document(doc)
    except TaskValidationError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.pointer == "" or problem.pointer.startswith("/")
            assert problem.message and "Traceback" not in problem.message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_raises_anything_but_a_clear_error(text: str) -> None:
    try:
        parse_task(text)
    except TaskValidationError as exc:
        assert exc.problems


# -- versions -----------------------------------------------------------------------------


def test_every_known_version_migrates_to_current() -> None:
    for version in KNOWN_VERSIONS:
        assert migrate({**MINIMAL, "version": version})["version"] == CURRENT_VERSION
    assert set(MIGRATIONS) == set(KNOWN_VERSIONS[:-1])
    assert migrate(MINIMAL)["version"] == CURRENT_VERSION  # no version means 2.5.0


def test_unknown_version_is_an_error() -> None:
    with pytest.raises(UnknownVersionError):
        migrate({**MINIMAL, "version": "3.0.0"})


# -- the CLI ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_validate_prints_the_normalized_task(tmp_path: Path) -> None:
    done = _cli("validate", str(CRYNUX / "crynux-minimal.json"))
    assert done.returncode == 0, done.stderr
    normalized = json.loads(done.stdout)
    assert normalized["train_args"]["batch_size"] == 16 and normalized["version"] == CURRENT_VERSION


def test_cli_validate_bad_document_exits_2_with_pointers_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**MINIMAL, "train_args": {"learning_rate": -1, "learnig_rate": 1}}))
    done = _cli("validate", str(bad))
    assert done.returncode == 2
    assert "/train_args/learning_rate: must be > 0, got -1" in done.stderr
    assert "did you mean learning_rate?" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_cli_schema_prints_the_committed_schema() -> None:
    done = _cli("schema")
    assert done.returncode == 0 and done.stdout == SCHEMA_PATH.read_text()
