"""Task format versions: bring an older task document up to the current version.

The Crynux finetune task has kept the same fields, nesting, defaults and meaning from
1.0.0 to 2.5.2 (the published schema of every version lists the same properties); the
versions moved because other task kinds of the network changed. So each step below only
restamps ``version``. The chain is kept explicit so that a future version with a real
change adds one function here and one test, and nothing else needs to know.

A document without ``version`` means Crynux's default, 2.5.0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.errors import LoraflowError
from engine.task.definition import CURRENT_VERSION, DEFAULT_DOCUMENT_VERSION, KNOWN_VERSIONS

Document = dict[str, Any]


def _restamp(to_version: str) -> Callable[[Document], Document]:
    def step(doc: Document) -> Document:
        return {**doc, "version": to_version}

    step.__doc__ = f"Same fields and meaning; only the version becomes {to_version}."
    return step


#: version -> the step that takes a document of that version to the next one.
MIGRATIONS: dict[str, Callable[[Document], Document]] = {
    older: _restamp(newer) for older, newer in zip(KNOWN_VERSIONS, KNOWN_VERSIONS[1:], strict=False)
}


class UnknownVersionError(LoraflowError, ValueError):
    """The document names a version this build does not know."""


def migrate(doc: Document) -> Document:
    """Return a copy of ``doc`` at :data:`CURRENT_VERSION`.

    Raises :class:`UnknownVersionError` for a version this build does not know (a newer
    format may change meanings, so guessing would be unsafe).
    """
    version = doc.get("version", DEFAULT_DOCUMENT_VERSION)
    if version not in KNOWN_VERSIONS:
        raise UnknownVersionError(
            f"unknown task format version {version!r}; known: {', '.join(KNOWN_VERSIONS)}"
        )
    doc = {**doc, "version": version}
    while doc["version"] != CURRENT_VERSION:
        doc = MIGRATIONS[doc["version"]](doc)
    return doc
