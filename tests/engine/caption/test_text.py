"""The instruction, the cleaning of answers and the caption written (engine.caption.text)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.caption.backend import CaptionError
from engine.caption.text import (
    clean_caption,
    instruction,
    refusal_reason,
    written_caption,
)
from engine.task.definition import CaptioningArgs


def _args(**changes: Any) -> CaptioningArgs:
    return CaptioningArgs(**{"backend": "openai", "model": "m", **changes})


# -- instruction -----------------------------------------------------------------------


def test_instruction_fills_trigger_and_class_name() -> None:
    args = _args(prompt="Caption this photo of {trigger}, a {class_name}.", trigger="sks",
                 class_name="dog")
    assert instruction(args) == "Caption this photo of sks, a dog."


def test_instruction_keeps_doubled_braces_as_literal_braces() -> None:
    assert instruction(_args(prompt="Answer as {{caption}}")) == "Answer as {caption}"


def test_instruction_without_placeholders_is_the_prompt() -> None:
    assert instruction(_args(prompt="Describe it.")) == "Describe it."


@pytest.mark.parametrize("prompt", ["Describe {subject}", "Describe {trigger.__class__}",
                                    "Describe {0}", "Describe {}"])
def test_instruction_refuses_an_unknown_placeholder_by_name(prompt: str) -> None:
    with pytest.raises(CaptionError, match=r"captioning\.prompt: unknown placeholder"):
        instruction(_args(prompt=prompt, trigger="sks"))


def test_instruction_refuses_a_placeholder_whose_value_is_not_set() -> None:
    with pytest.raises(CaptionError, match=r"uses \{class_name\} but captioning\.class_name"):
        instruction(_args(prompt="A photo of a {class_name}"))


def test_instruction_refuses_a_lone_brace() -> None:
    with pytest.raises(CaptionError, match="lone '}'"):
        instruction(_args(prompt="Describe it }"))


# -- clean_caption ---------------------------------------------------------------------


def test_clean_caption_strips_whitespace_and_surrounding_quotes() -> None:
    assert clean_caption('  "A red bicycle."  \n', _args()) == "A red bicycle."
    assert clean_caption("\u201cA red bicycle\u201d", _args()) == "A red bicycle"


def test_clean_caption_keeps_a_quote_that_is_not_a_pair() -> None:
    assert clean_caption("the dogs' bowl", _args()) == "the dogs' bowl"


@pytest.mark.parametrize("raw", [
    "The image shows a red bicycle",
    "the image shows: a red bicycle",
    "THE IMAGE SHOWS, a red bicycle",
    "The image shows that a red bicycle",
    "This image shows \"a red bicycle\"",
])
def test_clean_caption_strips_a_leading_phrase_in_any_case(raw: str) -> None:
    assert clean_caption(raw, _args()) == "a red bicycle"


def test_clean_caption_strips_only_whole_words() -> None:
    assert clean_caption("An image offers contrast", _args()) == "An image offers contrast"
    assert clean_caption("The image shows thatched roofs", _args()) == "thatched roofs"


def test_clean_caption_strips_phrases_from_the_task_only_at_the_start() -> None:
    args = _args(strip_phrases=["Caption"])
    assert clean_caption("Caption: a dog. Caption: none", args) == "a dog. Caption: none"


def test_clean_caption_collapses_whitespace_and_lowercases_when_asked() -> None:
    assert clean_caption("A  Red\n\tBicycle", _args(lowercase=True)) == "a red bicycle"
    assert clean_caption("A  Red\n\tBicycle", _args()) == "A Red Bicycle"


@pytest.mark.parametrize("raw", ["", "   ", '""', "The image shows", "The image shows: "])
def test_clean_caption_of_nothing_left_is_none(raw: str) -> None:
    assert clean_caption(raw, _args()) is None


# -- refusal_reason ----------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["I can't help with that.", "I\u2019m sorry, but I cannot",
                                 "I cannot describe this image.", "Sorry, I can't do that",
                                 "I am unable to caption people", "As an AI, I won't"])
def test_refusal_reason_recognises_a_refusal(raw: str) -> None:
    reason = refusal_reason(raw)
    assert reason is not None and reason.startswith("refused: ")


def test_refusal_reason_of_a_caption_is_none() -> None:
    assert refusal_reason("A man holding a sign saying I can't") is None


# -- written_caption ---------------------------------------------------------------------


def test_written_caption_fills_the_template() -> None:
    args = _args(caption_template="{trigger} {class_name}, {caption}", trigger="sks",
                 class_name="dog", mode="all")
    assert written_caption("on the grass", None, args) == "sks dog, on the grass"


def test_written_caption_template_does_not_format_the_caption_itself() -> None:
    assert written_caption("a {trigger} sign", None, _args(trigger="sks")) == "a {trigger} sign"


def test_written_caption_missing_mode_keeps_an_existing_caption() -> None:
    assert written_caption("new", "old caption", _args(mode="missing")) == "old caption"
    assert written_caption("new", "  ", _args(mode="missing")) == "new"


def test_written_caption_all_mode_replaces_an_existing_caption() -> None:
    assert written_caption("new", "old", _args(mode="all")) == "new"


def test_written_caption_prepends_and_appends_to_an_existing_caption() -> None:
    assert written_caption("new", "old", _args(mode="prepend")) == "new, old"
    assert written_caption("new", "old", _args(mode="append")) == "old, new"
    assert written_caption("new", None, _args(mode="append")) == "new"


def test_written_caption_refuses_a_template_placeholder_that_is_not_set() -> None:
    with pytest.raises(CaptionError, match=r"captioning\.caption_template uses \{trigger\}"):
        written_caption("x", None, _args(caption_template="{trigger}, {caption}"))
