"""The text around a caption: the instruction sent, the answer cleaned, the caption written.

Pure functions of the task's ``captioning`` section, shared by the caption step and every
backend, so a local model and an API get the same instruction and their answers the same
treatment. Templates are filled by a strict parser of ``{name}`` placeholders (``{{`` and
``}}`` for literal braces), never by ``str.format``: a task is not trusted, and
``format`` would reach attributes (``{caption.__class__}``) and fail with a bare KeyError.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from engine.caption.backend import CaptionError
from engine.task.definition import CaptioningArgs

__all__ = ["clean_caption", "fill_template", "instruction", "refusal_reason",
           "written_caption"]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
#: Quote pairs a model wraps its answer in ("A dog on grass.").
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019",
                "\u00ab": "\u00bb"}
#: What may follow a stripped leading phrase: "The image shows: ...", ", ...", " that ...".
_AFTER_PHRASE = re.compile(r"^\s*(?::|,|that\b)?\s*", re.IGNORECASE)
#: How refusals start ("I can't help with that", "I'm sorry, but ..."); no caption does.
_REFUSAL_START = re.compile(
    r"^(?:i\s+can(?:'|no)?t|i\s+can\s+not|i\s+cannot|i\s+am\s+(?:sorry|unable|not\s+able)"
    r"|i'm\s+(?:sorry|unable|not\s+able)|i\s+won't|i\s+will\s+not|sorry\b|as\s+an\s+ai\b)",
    re.IGNORECASE,
)
_MAX_REASON = 200  # characters of a refusal kept in its reason


def fill_template(template: str, values: Mapping[str, str | None], where: str) -> str:
    """``template`` with each ``{name}`` replaced by ``values[name]``.

    ``where`` names the field in messages (``captioning.prompt``). An unknown name, a
    placeholder whose value is not set, or a lone brace is a :class:`CaptionError`.
    """

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name is None:
            raise CaptionError(f"{where}: a lone {token!r} in {template!r}; write "
                               f"'{token * 2}' for a literal brace")
        if name not in values:
            known = ", ".join(f"{{{k}}}" for k in values)
            raise CaptionError(f"{where}: unknown placeholder {{{name}}} in {template!r}; "
                               f"known: {known}")
        value = values[name]
        if value is None:
            raise CaptionError(f"{where} uses {{{name}}} but captioning.{name} is not set")
        return value

    return _PLACEHOLDER.sub(substitute, template)


def instruction(args: CaptioningArgs) -> str:
    """The instruction sent to the model: ``prompt`` with {trigger} and {class_name}."""
    values = {"trigger": args.trigger, "class_name": args.class_name}
    return fill_template(args.prompt, values, "captioning.prompt")


def refusal_reason(raw: str) -> str | None:
    """``"refused: ..."`` when an answer reads as a refusal rather than a caption, else None.

    Only the start of the answer counts: a model that will not describe an image says so
    first ("I can't help with that", "I'm sorry, but..."), and no caption starts that way.
    """
    text = " ".join(raw.replace("\u2019", "'").split())
    if not _REFUSAL_START.match(text):
        return None
    return f"refused: {text[:_MAX_REASON]}"


def clean_caption(raw: str, args: CaptioningArgs) -> str | None:
    """A model's answer as a caption, or None when nothing is left.

    Surrounding whitespace and quotes go, then a leading phrase of ``strip_phrases``
    (case-insensitive, whole words, with a following ':', ',' or 'that'), repeatedly;
    whitespace is collapsed and, if asked, the caption lower-cased.
    """
    text = _unquote(raw)
    phrases = sorted((p for p in args.strip_phrases if p.strip()), key=len, reverse=True)
    stripped = True
    while stripped and text:
        stripped = False
        for phrase in phrases:
            rest = _after_leading(text, phrase.strip())
            if rest is not None:
                text, stripped = _unquote(_AFTER_PHRASE.sub("", rest, count=1)), True
                break
    text = " ".join(text.split())
    if args.lowercase:
        text = text.lower()
    return text or None


def written_caption(generated: str, existing: str | None, args: CaptioningArgs) -> str:
    """The caption written for an image: ``generated`` through ``caption_template``, and
    combined with the ``existing`` caption as ``mode`` says.

    'missing' keeps an existing caption (the step captions only images without one);
    'all' replaces it; 'prepend'/'append' join the two with ", ".
    """
    values = {"caption": generated, "trigger": args.trigger, "class_name": args.class_name}
    text = " ".join(fill_template(args.caption_template, values,
                                  "captioning.caption_template").split())
    existing = (existing or "").strip()
    if not existing or args.mode == "all":
        return text
    if args.mode == "missing":
        return existing
    if args.mode == "prepend":
        return f"{text}, {existing}"
    return f"{existing}, {text}"


def _unquote(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _after_leading(text: str, phrase: str) -> str | None:
    """What follows ``phrase`` at the start of ``text`` (any case, ending at a word
    boundary: "An image of" does not strip "An image offers"), or None."""
    if not phrase or text[:len(phrase)].casefold() != phrase.casefold():
        return None
    rest = text[len(phrase):]
    if rest and phrase[-1].isalnum() and (rest[0].isalnum() or rest[0] == "_"):
        return None
    return rest
