"""Captions already made, kept by (image sha256, captioner fingerprint) on any storage.

Why: captioning is the slowest, and for an API the costliest, thing before training; a
re-run, a retried flow or a second worker must never ask again for an answer that was
had once. Each answer is one small JSON file, written atomically the moment it comes
back (:func:`engine.store.storage.write_bytes`), so a crash mid-way keeps every caption
made before it and a reader never sees half a file::

    {root}/{fingerprint digest}/fingerprint.json     what made these answers (for people)
    {root}/{fingerprint digest}/{image sha256}.json  {"caption": ..., "reason": ...}

The root is any fsspec location, always the one
:func:`engine.data.prepared.caption_root` derives from the data folder (``captions/``
in it: an ``s3://`` data folder shares answers between workers), so the flow, ``loraflow
caption`` and ``loraflow segment`` read and write the same answers. An empty or refused
answer is kept too: the same model and prompt give it again (greedy decoding), so asking
twice would only cost time; delete the fingerprint's folder to ask afresh. A file that
does not read as an answer (hand-edited, torn by another tool) counts as not cached
and is written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping

from engine.caption.backend import CaptionOutcome
from engine.data.identity import canonical_json
from engine.store import storage

log = logging.getLogger(__name__)

FINGERPRINT_NAME = "fingerprint.json"


def fingerprint_digest(fingerprint: Mapping[str, str]) -> str:
    """The fingerprint as a folder name: 16 hex digits of its canonical JSON's sha256."""
    return hashlib.sha256(canonical_json(dict(fingerprint)).encode()).hexdigest()[:16]


class CaptionCache:
    """The answers of one captioner (one fingerprint) under ``root`` (no default here: a
    second default would be a second cache that the other entry points never read)."""

    def __init__(self, root: str, fingerprint: Mapping[str, str]) -> None:
        self.fingerprint = dict(fingerprint)
        self.folder = storage.join(root, fingerprint_digest(fingerprint))
        self._described = False

    def get(self, sha256: str) -> CaptionOutcome | None:
        """The answer kept for the image with ``sha256``; None when there is none."""
        url = self._url(sha256)
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            return None
        outcome = _outcome(data)
        if outcome is None:
            log.warning("caption cache: %s is not a cached answer; captioning again", url)
        return outcome

    def put(self, sha256: str, outcome: CaptionOutcome) -> None:
        """Keep ``outcome`` for the image with ``sha256`` (atomically; replaces any)."""
        if not self._described:
            document = json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n"
            storage.write_bytes(storage.join(self.folder, FINGERPRINT_NAME), document.encode())
            self._described = True
        body = {"caption": outcome.caption, "reason": outcome.reason}
        storage.write_bytes(self._url(sha256), canonical_json(body).encode("utf-8"))

    def _url(self, sha256: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return storage.join(self.folder, f"{sha256}.json")


def _outcome(data: bytes) -> CaptionOutcome | None:
    """The answer a cache file holds, or None when it holds no valid one."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    caption, reason = body.get("caption"), body.get("reason")
    if not (caption is None or isinstance(caption, str)):
        return None
    if not (reason is None or isinstance(reason, str)) or (caption is None and reason is None):
        return None
    return CaptionOutcome(caption, reason)
