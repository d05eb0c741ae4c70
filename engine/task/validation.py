"""Turn a task document (file, URL or text) into a :class:`TaskDefinition`, or a full list
of problems, each a JSON pointer and a message a person can act on.

Order of checks: read -> parse JSON (no NaN/Infinity, no duplicate keys) -> version ->
JSON Schema (the committed file generated from the pydantic model) -> pydantic ->
cross-field rules. Every problem found at a stage is reported together; later stages run
only when the document is well-formed enough for them to mean anything.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema
from pydantic import ValidationError

from engine.errors import LoraflowError
from engine.store import storage
from engine.store.storage import StorageError
from engine.task.definition import DatasetArgs, OutputArgs, TaskDefinition
from engine.task.migration import UnknownVersionError, migrate

MAX_DOCUMENT_BYTES = 1 << 20
SCHEMA_RESOURCE = ("engine.task.schema", "finetune-task.schema.json")
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://\S+$")


@dataclass(frozen=True)
class Problem:
    pointer: str  # RFC 6901 JSON pointer; "" is the whole document
    message: str

    def __str__(self) -> str:
        return f"{self.pointer or '(document)'}: {self.message}"


class TaskValidationError(LoraflowError, ValueError):
    """A task document was refused; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem], source: str = "task") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


# -- reading and parsing -----------------------------------------------------------------


def read_task_text(location: str) -> str:
    """Read a task document from a local path or fsspec URL, with clear errors.

    Through the store: transient failures are retried, and storage that stays down is a
    ``StorageError`` (exit code 4, not "bad input"); messages never show credentials.
    """
    where = storage.redact(location)
    try:
        data = storage.read_bytes(location, limit=MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise TaskValidationError([Problem("", f"file not found: {where}")], where) from None
    except IsADirectoryError:
        raise TaskValidationError([Problem("", f"is a directory: {where}")], where) from None
    except StorageError:
        raise
    except (OSError, ValueError) as exc:
        problem = Problem("", f"cannot read {where}: {storage.redact(str(exc))}")
        raise TaskValidationError([problem], where) from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise TaskValidationError(
            [Problem("", f"document larger than {MAX_DOCUMENT_BYTES} bytes")], where
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaskValidationError(
            [Problem("", f"not UTF-8 text (byte {exc.start})")], where
        ) from None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON; numbers must be finite")


def parse_json(text: str) -> Any:
    """Parse strict JSON: no NaN/Infinity literals, no duplicate keys, bounded depth."""
    if not text.strip():
        raise TaskValidationError([Problem("", "empty document; expected a JSON object")])
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise TaskValidationError([Problem("", f"duplicate key {exc.args[0]!r}")]) from None
    except json.JSONDecodeError as exc:
        raise TaskValidationError(
            [Problem("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]
        ) from None
    except ValueError as exc:
        raise TaskValidationError([Problem("", str(exc))]) from None
    except RecursionError:
        raise TaskValidationError([Problem("", "document is nested too deeply")]) from None


def _pointer(path: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _non_finite_numbers(doc: Any) -> list[Problem]:
    """Numbers that overflowed to infinity (e.g. 1e400): JSON allows them, we cannot."""
    problems, stack = [], [((), doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(_pointer(path), "number out of range (not finite)"))
        elif isinstance(value, dict):
            stack.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in enumerate(value))
    return sorted(problems, key=lambda p: p.pointer)


# -- JSON Schema errors as sentences ----------------------------------------------------


@lru_cache(maxsize=1)
def committed_schema() -> dict[str, Any]:
    """The JSON Schema file shipped with the package (generated from the model)."""
    package, name = SCHEMA_RESOURCE
    return json.loads(resources.files(package).joinpath(name).read_text())


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = committed_schema()
    return jsonschema.Draft202012Validator(schema)


_JSON_TYPE = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else _json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref and ref.startswith("#/$defs/"):
        return committed_schema()["$defs"][ref.split("/")[-1]]
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _resolve(schema["allOf"][0])
    return schema


def _describe(schema: dict[str, Any]) -> str:
    """A short phrase for what a sub-schema accepts: 'an integer >= 1', 'null'."""
    schema = _resolve(schema)
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type", "value")
    phrase = {
        "integer": "an integer",
        "number": "a number",
        "string": "a string",
        "boolean": "true or false",
        "null": "null",
        "array": "a list",
        "object": "an object",
    }.get(kind, kind)
    if kind == "array" and "items" in schema:
        phrase = f"a list of {_describe(schema['items']).removeprefix('a ').removeprefix('an ')}s"
    for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<=")):
        if key in schema:
            phrase += f" {op} {schema[key]}"
    return phrase


def _schema_message(error: jsonschema.ValidationError) -> list[Problem]:
    where = _pointer(error.absolute_path)
    value, rule, limit = error.instance, error.validator, error.validator_value
    if rule == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        problems = []
        for key in sorted(set(value) - set(known)):
            hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            text = "unknown field" + (f"; did you mean {hint[0]}?" if hint else "")
            if not hint:
                text += f" (known: {', '.join(known)})"
            problems.append(Problem(_pointer([*error.absolute_path, key]), text))
        return problems
    if rule == "required":
        return [
            Problem(_pointer([*error.absolute_path, k]), "required field is missing")
            for k in limit
            if k not in value
        ]
    if rule == "type":
        got = _json_type(value)
        if not isinstance(value, (dict, list)):
            got += f" {_show(value)}"
        message = f"must be {_describe({'type': limit})}, got {got}"
    elif rule in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
        message = f"must be {op[rule]} {limit}, got {_show(value)}"
    elif rule == "minLength":
        message = "must not be empty" if limit == 1 else f"must be at least {limit} characters"
    elif rule == "maxLength":
        message = f"must be at most {limit} characters, got {len(value)}"
    elif rule == "minItems":
        message = f"must have at least {limit} item(s)"
    elif rule == "enum":
        message = f"must be one of {', '.join(json.dumps(v) for v in limit)}; got {_show(value)}"
    elif rule in ("anyOf", "oneOf"):
        return _alternatives_message(error, where)
    else:
        message = error.message
    return [Problem(where, message)]


def _alternatives_message(error: jsonschema.ValidationError, where: str) -> list[Problem]:
    """For 'X or null' fields, report why the non-null alternative failed."""
    options = error.validator_value
    non_null = [o for o in options if _resolve(o).get("type") != "null"]
    if len(non_null) == 1 and error.instance is not None:
        sub_errors = [e for e in error.context if e.schema_path[0] == options.index(non_null[0])]
        if sub_errors:
            return [p for e in sub_errors for p in _schema_message(e)]
    accepted = " or ".join(_describe(o) for o in options)
    return [Problem(where, f"must be {accepted}; got {_show(error.instance)}")]


# -- rules between fields ---------------------------------------------------------------


def cross_field_problems(task: TaskDefinition) -> list[Problem]:
    """Rules JSON Schema cannot say, each a mistake a user can really make."""
    problems: list[Problem] = []
    add = lambda pointer, message: problems.append(Problem(pointer, message))  # noqa: E731
    ta, lora = task.train_args, task.lora
    for where, ds in _subset_pointers(task):
        problems += _subset_problems(ds, where)

    if task.model.name.lower().endswith((".ckpt", ".safetensors", ".pt", ".bin", ".pth")):
        add(
            "/model/name",
            "single-file checkpoints are not supported; give a Hub ID or a diffusers-format "
            "folder (model_index.json, unet/, vae/, ...)",
        )

    if ta.resolution % 8:
        add(
            "/train_args/resolution",
            f"must be a positive multiple of 8 (the VAE downsamples by 8), got {ta.resolution}",
        )
    both_steps = ta.num_train_steps is not None and ta.max_train_steps is not None
    if both_steps and ta.num_train_steps > ta.max_train_steps:
        add(
            "/train_args/num_train_steps",
            f"must be <= max_train_steps ({ta.max_train_steps}), got {ta.num_train_steps}",
        )
    by_epochs = ta.num_train_steps is None and ta.max_train_steps is None
    if by_epochs and ta.num_train_epochs > ta.max_train_epochs:
        add(
            "/train_args/num_train_epochs",
            f"must be <= max_train_epochs ({ta.max_train_epochs}), got {ta.num_train_epochs}",
        )
    warmup = ta.lr_scheduler.lr_warmup_steps
    uses_warmup = ta.lr_scheduler.lr_scheduler != "constant"
    if uses_warmup and ta.max_train_steps is not None and warmup > ta.max_train_steps:
        add(
            "/train_args/lr_scheduler/lr_warmup_steps",
            f"warmup ({warmup}) is longer than the whole training (max_train_steps "
            f"{ta.max_train_steps})",
        )

    if isinstance(lora.target_modules, str):
        try:
            re.compile(lora.target_modules)
        except re.error as exc:
            add("/lora/target_modules", f"not a valid regular expression: {exc}")
        if not lora.target_modules.strip():
            add("/lora/target_modules", "must not be empty; use null for the default modules")
    elif isinstance(lora.target_modules, list):
        if not lora.target_modules:
            add("/lora/target_modules", "must not be an empty list; use null for the default")
        for i, name in enumerate(lora.target_modules):
            if not name.strip():
                add(f"/lora/target_modules/{i}", "must not be empty")

    if lora.init_lora_weights == "loftq":
        add(
            "/lora/init_lora_weights",
            "'loftq' initialises the adapter for a quantized base model by rewriting the base "
            "weights, so the LoRA would not fit the unmodified model users load it onto; "
            "loraflow trains on unquantized weights: use true or \"gaussian\"",
        )
    if task.validation.prompt is not None and not task.validation.prompt.strip():
        add("/validation/prompt", "must not be empty; use null to draw prompts from captions")
    from engine.infer.validation_set import schedule_problems  # noqa: PLC0415 - no cycle

    problems += [Problem(pointer, message) for pointer, message in schedule_problems(task)]
    formats = task.output.lora_formats
    if len(set(formats)) != len(formats):
        add("/output/lora_formats", "lists a format more than once")
    if task.training_type == "full":
        problems += full_finetune_problems(task)
    return problems


def full_finetune_problems(task: TaskDefinition) -> list[Problem]:
    """LoRA-only options given to a full fine-tune, which would be silently ignored.

    (``lora.text_encoder`` is refused by the schema already.) ``output.lora_formats`` is
    refused when it differs from its default: a task sent through Prefect arrives with
    every field set, so "given" cannot be told from "default" there.
    """
    full = "a full fine-tune (training_type 'full')"
    problems = []
    if task.output.lora_formats != OutputArgs().lora_formats:
        problems.append(Problem("/output/lora_formats", f"is for LoRA files; {full} publishes "
                                "model/diffusers/ and one single-file checkpoint: remove it"))
    if task.lora.type != "lora":
        problems.append(Problem("/lora/type", f"is {task.lora.type!r}, an adapter; {full} "
                                "trains no adapter: remove it or set training_type 'lora'"))
    if task.lora.conv is not None:
        problems.append(Problem("/lora/conv", f"adapts convolutions with LoRA; {full} trains "
                                "every UNet weight already: remove it"))
    ema = task.train_args.ema
    if ema is not None and ema.publish_both:
        problems.append(Problem("/train_args/ema/publish_both", f"{full} publishes one "
                                "model, the ema.publish weights: set publish_both to false"))
    return problems


def _subset_pointers(task: TaskDefinition) -> list[tuple[str, DatasetArgs]]:
    if task.datasets is None:
        return [("/dataset", task.subsets[0])]
    return [(f"/datasets/{i}", ds) for i, ds in enumerate(task.datasets)]


def _subset_problems(ds: DatasetArgs, where: str) -> list[Problem]:
    """One data source's own rules: one place to read from, distinct columns."""
    problems: list[Problem] = []
    given = [k for k in ("name", "url", "shards") if getattr(ds, k) is not None]
    if len(given) != 1:
        which = f"{' and '.join(given)} are set" if given else "none is set"
        problems.append(Problem(where, f"set exactly one of name, url and shards; {which}"))
    if ds.url is not None and not URL_RE.match(ds.url):
        problems.append(Problem(
            f"{where}/url", f"must be a URL such as https://... or s3://...; got {_show(ds.url)}"
        ))
    if ds.image_column == ds.caption_column:
        problems.append(Problem(f"{where}/caption_column", "must differ from image_column"))
    return problems


# -- the whole pipeline ---------------------------------------------------------------


def validate_document(doc: Any, source: str = "task") -> TaskDefinition:
    """Validate a parsed JSON value; return the normalized task or raise with all problems."""
    if not isinstance(doc, dict):
        raise TaskValidationError(
            [Problem("", f"must be a JSON object, got {_json_type(doc)}")], source
        )
    problems = _non_finite_numbers(doc)
    if problems:
        raise TaskValidationError(problems, source)
    try:
        doc = migrate(doc)
    except UnknownVersionError as exc:
        raise TaskValidationError([Problem("/version", str(exc))], source) from None

    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    problems = _dataset_sections(doc) + [p for e in errors for p in _schema_message(e)]
    if problems:
        raise TaskValidationError(_unique(problems), source)
    try:
        task = TaskDefinition.model_validate(doc)
    except ValidationError as exc:  # the schema should have caught these; stay readable
        problems = [Problem(_pointer(e["loc"]), e["msg"]) for e in exc.errors()]
        raise TaskValidationError(problems, source) from None
    problems = cross_field_problems(task)
    if problems:
        raise TaskValidationError(problems, source)
    return task


def _dataset_sections(doc: dict[str, Any]) -> list[Problem]:
    """Exactly one of ``dataset`` (a Crynux task's one source) and ``datasets``."""
    given = [k for k in ("dataset", "datasets") if doc.get(k) is not None]  # null: not set
    if not given:
        return [Problem("/dataset", "required field is missing")]
    if len(given) == 2:
        return [Problem("/datasets", "set exactly one of dataset (one source) and datasets "
                                     "(several subsets), not both")]
    return []


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def parse_task(text: str, source: str = "task") -> TaskDefinition:
    """Validate a task given as JSON text."""
    try:
        doc = parse_json(text)
    except TaskValidationError as exc:
        raise TaskValidationError(exc.problems, source) from None
    return validate_document(doc, source)


def load_task(location: str) -> TaskDefinition:
    """Read and validate a task document from a local path or fsspec URL."""
    return parse_task(read_task_text(location), source=storage.redact(location))
