"""Command-line overrides of a task document: ``train_args.learning_rate=5e-5 lora.rank=16``.

An override is a dotted key path, ``=``, and a value. The value is read as JSON (``5e-5``,
``true``, ``null``, ``[1, 2]``, ``"16"``) and, where it is not JSON, taken as the string it
is (``model.name=runwayml/stable-diffusion-v1-5``). A path step into a list is an index
(``lora.target_modules.0=to_q``); a missing or null section is created.

Overrides are merged into the parsed document *before* validation, so what an override
says is checked exactly like the file: a typo in a key gets the same "did you mean" hint
(``/train_args/learnig_rate: unknown field; did you mean learning_rate?``), a value out of
range the same message. Each problem an override caused names that override, so a user
knows whether to fix the file or the command line. The merge itself is a pure function
(:func:`apply_overrides`): document and overrides in, new document out.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.store import storage
from engine.task.definition import TaskDefinition
from engine.task.migration import UnknownVersionError, migrate
from engine.task.validation import (
    Problem,
    TaskValidationError,
    parse_json,
    read_task_text,
    validate_document,
)


@dataclass(frozen=True)
class Override:
    """One ``key.path=value`` from the command line, parsed."""

    text: str  # as the user wrote it, for messages and the run summary
    path: tuple[str, ...]
    value: Any

    @property
    def pointer(self) -> str:
        """The RFC 6901 JSON pointer of the field it sets, as validation problems use."""
        return pointer_of(self.path)


def pointer_of(path: Sequence[str]) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in path)


def _no_constant(name: str) -> Any:
    raise ValueError(name)  # NaN / Infinity are not JSON: keep the text as a string


def parse_value(raw: str) -> Any:
    """The value of an override: JSON if it parses as JSON, else the string itself."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return raw


def parse_override(text: str) -> Override:
    """``"a.b=v"`` -> :class:`Override`; a malformed one is a problem, like a bad file."""
    key, equals, raw = text.partition("=")
    path = tuple(key.strip().split("."))
    if not equals or not all(path):
        raise TaskValidationError(
            [Problem("", f"override {text!r} must look like KEY.PATH=VALUE, e.g. "
                         "train_args.learning_rate=5e-5")],
            "command line",
        )
    return Override(text=text, path=path, value=parse_value(raw))


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else type(value).__name__


def _refuse(path: Sequence[str], message: str, override: Override) -> TaskValidationError:
    return TaskValidationError(
        [Problem(pointer_of(path), f"{message} (override {override.text})")], "command line"
    )


def _set(doc: dict[str, Any], override: Override) -> None:
    """Set ``override`` in ``doc`` in place; a path through a plain value is a problem."""
    node: Any = doc
    for depth, key in enumerate(override.path):
        above = override.path[:depth]
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise _refuse(above, f"is a list of {len(node)} item(s); {key!r} is not an "
                                     "index in it", override)
            index: int | str = int(key)
        elif isinstance(node, dict):
            index = key
            if depth < len(override.path) - 1 and node.get(key) is None:
                node[key] = {}  # a missing or null section: the override creates it
        else:
            raise _refuse(above, f"is {_json_kind(node)}, not an object: cannot set {key!r} "
                                 "in it", override)
        if depth == len(override.path) - 1:
            node[index] = copy.deepcopy(override.value)
        else:
            node = node[index]


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``doc`` with each ``key.path=value`` of ``overrides`` set, in order."""
    merged = copy.deepcopy(doc)
    for text in overrides:
        _set(merged, parse_override(text))
    return merged


def _caused_by(problem: Problem, override: Override) -> bool:
    """Whether ``problem`` is about the field an override set (or a section it created)."""
    if not problem.pointer:
        return False
    target = override.pointer
    return (problem.pointer == target or problem.pointer.startswith(target + "/")
            or target.startswith(problem.pointer + "/"))


def _name_overrides(problems: list[Problem], overrides: list[Override]) -> list[Problem]:
    named = []
    for problem in problems:
        causes = [o.text for o in overrides if _caused_by(problem, o)]
        if causes:
            problem = Problem(problem.pointer,
                              f"{problem.message} (override {', '.join(causes)})")
        named.append(problem)
    return named


def validate_with_overrides(doc: Any, overrides: Sequence[str],
                            source: str = "task") -> TaskDefinition:
    """Validate ``doc`` with ``overrides`` merged in, exactly as a document is validated.

    The overrides are set on the document at the current format version (the fields
    ``loraflow validate`` prints); an unknown version is reported by validation as usual.
    """
    parsed = [parse_override(text) for text in overrides]
    if parsed and isinstance(doc, dict):
        with contextlib.suppress(UnknownVersionError):  # validation says so, by pointer
            doc = migrate(doc)
        doc = apply_overrides(doc, overrides)
    try:
        return validate_document(doc, source)
    except TaskValidationError as exc:
        raise TaskValidationError(_name_overrides(exc.problems, parsed), exc.source) from None


def load_task_with_overrides(location: str, overrides: Sequence[str] = ()) -> TaskDefinition:
    """Read the task document at ``location``, apply ``overrides``, validate the result."""
    source = storage.redact(location)
    try:
        doc = parse_json(read_task_text(location))
    except TaskValidationError as exc:
        raise TaskValidationError(exc.problems, source) from None
    return validate_with_overrides(doc, overrides, source)
