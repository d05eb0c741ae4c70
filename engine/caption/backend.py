"""What every captioner is: images in, one outcome per image out, with a fingerprint.

The caption step (``engine.caption.step``) knows nothing of models or HTTP: it hands a
:class:`Captioner` batches of :class:`ImageToCaption` and keeps what comes back, cached by
``(image sha256, fingerprint)``. A backend never raises for one bad answer (an empty or
refused reply is an outcome with a reason); it raises :class:`CaptionError` when it cannot
go on at all (a server down after its retries, a model that does not exist).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from engine.errors import LoraflowError


class CaptionError(LoraflowError):
    """Captioning cannot go on: names the backend, the model and, when one, the image."""


@dataclass(frozen=True)
class ImageToCaption:
    """One image to caption: its name in the dataset (for messages), its content hash and
    its pixels (RGB)."""

    name: str
    sha256: str
    image: Image.Image


@dataclass(frozen=True)
class CaptionOutcome:
    """The answer for one image: a caption, or None with the reason it has none."""

    caption: str | None
    reason: str | None = None  # why there is no caption ("empty answer", "refused: ...")


class Captioner(Protocol):
    """A captioning backend, built from the task's ``captioning`` section."""

    @property
    def fingerprint(self) -> dict[str, str]:
        """What makes its answers what they are: backend, model, revision, prompt (the
        filled-in instruction), max_length. Part of the cache key; never a credential."""
        ...

    def caption(self, images: Sequence[ImageToCaption]) -> list[CaptionOutcome]:
        """One outcome per image, in order (the raw answer: post-filtering is the step's)."""
        ...
