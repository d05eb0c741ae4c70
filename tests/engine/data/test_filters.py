"""Declarative filters (engine/data/filters.py): data, never code; clear errors naming where."""

from __future__ import annotations

import pytest

from engine.data.errors import DatasetError
from engine.data.filters import passes
from engine.task.definition import FilterArgs

RECORD = {"aesthetic_score": 5.2, "source": "laion", "nsfw": False,
          "meta": {"width": 512, "tags": "cat"}}


def rule(field: str, op: str, value, missing: str = "error") -> FilterArgs:
    return FilterArgs(field=field, op=op, value=value, missing=missing)


@pytest.mark.parametrize(("op", "value", "expected"), [
    (">", 4.5, True), (">", 5.2, False), (">=", 5.2, True), ("<", 6, True),
    ("<=", 5.0, False), ("==", 5.2, True), ("!=", 5.2, False),
])
def test_numeric_comparisons(op: str, value: float, expected: bool) -> None:
    assert passes(RECORD, [rule("aesthetic_score", op, value)]) is expected


def test_dotted_field_reaches_into_nested_objects() -> None:
    assert passes(RECORD, [rule("meta.width", ">=", 512)])
    assert not passes(RECORD, [rule("meta.width", ">", 512)])


def test_in_and_not_in_lists() -> None:
    assert passes(RECORD, [rule("source", "in", ["laion", "coyo"])])
    assert not passes(RECORD, [rule("source", "not_in", ["laion"])])
    assert passes(RECORD, [rule("meta.tags", "not_in", ["dog"])])


def test_every_filter_must_pass() -> None:
    assert not passes(RECORD, [rule("aesthetic_score", ">", 4.5), rule("nsfw", "==", True)])
    assert passes(RECORD, [rule("aesthetic_score", ">", 4.5), rule("nsfw", "==", False)])
    assert passes(RECORD, [])


def test_missing_field_is_an_error_naming_field_and_record_by_default() -> None:
    with pytest.raises(DatasetError, match=r"'meta\.height' is missing in shard a\.tar member 7"):
        passes(RECORD, [rule("meta.height", ">", 1)], where="shard a.tar member 7")


def test_missing_field_exclude_and_include() -> None:
    assert not passes(RECORD, [rule("clip_score", ">", 0.3, missing="exclude")])
    assert passes(RECORD, [rule("clip_score", ">", 0.3, missing="include")])


def test_string_compared_to_number_is_a_clear_error() -> None:
    with pytest.raises(DatasetError, match=r"source='laion' \(string\).*4\.5 \(number\)"):
        passes(RECORD, [rule("source", ">", 4.5)], where="row 3")
    with pytest.raises(DatasetError, match="row 3"):
        passes(RECORD, [rule("source", "==", 4.5)], where="row 3")


def test_bool_is_not_a_number() -> None:
    with pytest.raises(DatasetError, match=r"\(bool\)"):
        passes(RECORD, [rule("nsfw", "==", 0)])


def test_list_value_needs_in_or_not_in() -> None:
    with pytest.raises(DatasetError, match="use 'in' or 'not_in'"):
        passes(RECORD, [rule("source", "==", ["laion"])])


def test_null_field_passes_only_inequality() -> None:
    record = {"score": None}
    assert not passes(record, [rule("score", "==", 1)])
    assert passes(record, [rule("score", "!=", 1)])
    assert not passes(record, [rule("score", "in", [1])])
    with pytest.raises(DatasetError, match="null"):
        passes(record, [rule("score", ">", 1)])


def test_code_in_filters_is_refused_by_the_schema() -> None:
    from pydantic import ValidationError

    from engine.task.definition import DatasetArgs

    with pytest.raises(ValidationError, match="never evaluated"):
        DatasetArgs(name="x", filters=["lambda x: x['aesthetic_score'] > 4.5"])
