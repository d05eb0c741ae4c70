"""The caption cache: one atomic JSON file per (fingerprint, image), on any storage."""

from __future__ import annotations

import hashlib

import pytest

from engine.caption.backend import CaptionOutcome
from engine.caption.cache import CaptionCache, fingerprint_digest
from engine.store import storage

SHA = hashlib.sha256(b"image").hexdigest()
FINGERPRINT = {"backend": "transformers", "model": "m", "prompt": "p"}


def test_an_answer_put_is_got_back_under_the_same_fingerprint_only(tmp_path):
    CaptionCache(str(tmp_path), FINGERPRINT).put(SHA, CaptionOutcome("a cat"))
    assert CaptionCache(str(tmp_path), FINGERPRINT).get(SHA) == CaptionOutcome("a cat")
    other = {**FINGERPRINT, "prompt": "q"}
    assert CaptionCache(str(tmp_path), other).get(SHA) is None


def test_an_empty_answer_is_kept_with_its_reason(tmp_path):
    cache = CaptionCache(str(tmp_path), FINGERPRINT)
    cache.put(SHA, CaptionOutcome(None, "empty answer"))
    assert cache.get(SHA) == CaptionOutcome(None, "empty answer")


def test_a_file_that_is_no_answer_counts_as_not_cached(tmp_path):
    cache = CaptionCache(str(tmp_path), FINGERPRINT)
    folder = tmp_path / fingerprint_digest(FINGERPRINT)
    folder.mkdir()
    (folder / f"{SHA}.json").write_text('{"caption": 3}')
    assert cache.get(SHA) is None


def test_it_works_on_any_fsspec_storage_and_describes_its_fingerprint():
    root = "memory://caption-cache-test"
    cache = CaptionCache(root, FINGERPRINT)
    cache.put(SHA, CaptionOutcome("a dog"))
    assert CaptionCache(root, FINGERPRINT).get(SHA) == CaptionOutcome("a dog")
    described = storage.read_bytes(f"{root}/{fingerprint_digest(FINGERPRINT)}/fingerprint.json")
    assert b'"model": "m"' in described


def test_a_key_that_is_not_a_sha256_is_refused(tmp_path):
    with pytest.raises(ValueError):
        CaptionCache(str(tmp_path), FINGERPRINT).get("../../etc/passwd")
