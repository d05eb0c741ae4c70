"""The data package's errors: what a user gets when a dataset or its archive is refused.

Both are :class:`~engine.errors.LoraflowError` (exit code 2, bad input): the message says
what to fix. A storage outage while a dataset is read or written is not one of these but
:class:`engine.store.storage.StorageError` (exit code 4), raised by the store.
"""

from __future__ import annotations

from engine.errors import LoraflowError


class DatasetError(LoraflowError, ValueError):
    """A dataset that cannot be prepared or read, with a message saying what to fix."""


class ArchiveError(LoraflowError, ValueError):
    """An archive (or a member of it) that is refused or cannot be read."""


class FetchError(ArchiveError):
    """A download or copy that failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
