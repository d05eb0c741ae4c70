"""Declarative metadata filters: keep a record only if each of its fields passes a comparison.

A filter is data (:class:`engine.task.definition.FilterArgs`: ``{"field": "aesthetic_score",
"op": ">", "value": 4.5}``), never code: the Stable Cascade seed's ``lambda`` strings ran
whatever a task document said. Here an operator is looked up in a fixed table, and a
comparison that Python would raise on or, worse, answer oddly (``"7" > 4.5``, ``True == 1``)
is a :class:`DatasetError` naming the field, the values and the record.

``field`` reaches into nested objects with dots (``"meta.width"``); a record that lacks it
is refused, left out or kept, as the filter's ``missing`` says.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from engine.data.errors import DatasetError
from engine.task.definition import FilterArgs

_MISSING = object()

_ORDERED: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def passes(record: Mapping[str, Any], filters: list[FilterArgs], *, where: str = "record") -> bool:
    """Whether ``record`` passes every filter (a record passes an empty list).

    ``where`` names the record in messages (``"row 12"``, ``"shard 0003.tar member 000042"``).
    Raises :class:`DatasetError` for a missing field under ``missing="error"`` and for a
    comparison between kinds that do not compare (a string with a number, a list with a
    scalar).
    """
    for rule in filters:
        value = field_value(record, rule.field)
        if value is _MISSING:
            if rule.missing == "error":
                raise DatasetError(
                    f"filter field {rule.field!r} is missing in {where}; set the filter's "
                    "'missing' to 'exclude' or 'include' if some records lack it"
                )
            if rule.missing == "exclude":
                return False
            continue
        if not _compare(value, rule, where):
            return False
    return True


def field_value(record: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` ("a.b.c") inside nested mappings, or a private sentinel."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _kind(value: Any) -> str:
    """The comparison class of a value: numbers compare with numbers, strings with strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _mismatch(value: Any, rule: FilterArgs, expected: Any, where: str) -> DatasetError:
    return DatasetError(
        f"filter {rule.field!r} {rule.op} {rule.value!r}: {where} has {rule.field}="
        f"{value!r} ({_kind(value)}), which does not compare with {expected!r} "
        f"({_kind(expected)})"
    )


def _equal(value: Any, expected: Any, rule: FilterArgs, where: str) -> bool:
    """Equality within one kind; across kinds (except null, which equals nothing) an error."""
    if value is None:
        return False
    if _kind(value) != _kind(expected):
        raise _mismatch(value, rule, expected, where)
    return bool(value == expected)


def _compare(value: Any, rule: FilterArgs, where: str) -> bool:
    expected = rule.value
    if rule.op in ("in", "not_in"):
        if not isinstance(expected, list):
            raise DatasetError(f"filter {rule.field!r} {rule.op}: 'value' must be a list")
        kinds = {_kind(v) for v in expected}
        if value is not None and _kind(value) not in kinds:
            raise _mismatch(value, rule, expected, where)
        found = value is not None and any(value == v and _kind(v) == _kind(value)
                                          for v in expected)
        return found if rule.op == "in" else not found
    if isinstance(expected, list):
        raise DatasetError(
            f"filter {rule.field!r} {rule.op}: 'value' is a list; use 'in' or 'not_in'"
        )
    if rule.op == "==":
        return _equal(value, expected, rule, where)
    if rule.op == "!=":
        return value is None or not _equal(value, expected, rule, where)
    if _kind(value) != _kind(expected) or _kind(value) not in ("number", "string"):
        raise _mismatch(value, rule, expected, where)
    return bool(_ORDERED[rule.op](value, expected))
