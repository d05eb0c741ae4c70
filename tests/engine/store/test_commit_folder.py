"""The generic commit protocol (folders of named files, manifest last) and its users that
are not checkpoints: the cache finds "no cache yet" by exception type, never by text."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from engine.store import commit, storage
from engine.store.commit import (
    CHECKPOINT,
    FOLDER,
    MANIFEST_NAME,
    CheckpointError,
    CommitError,
    FolderKind,
    NotCommittedError,
    commit_checkpoint,
    commit_folder,
    is_committed,
    read_checkpoint,
    read_folder,
    read_folder_manifest,
    read_verified_file,
    remove_folder,
)
from engine.store.safetensors_io import dump
from engine.train import cache as cache_module
from engine.train.cache import CACHE, open_cache

FILES = {"images/0.png": b"\x89PNG-zero", "index.json": b'{"count": 1}'}
DATASET = FolderKind("loraflow-dataset/1", "prepared dataset", {"content_hash": str})


def test_round_trip_with_meta_and_default_kind(tmp_path: Path) -> None:
    url = str(tmp_path / "folder")
    written = commit_folder(url, FILES, {"count": 1, "source": "demo"})

    loaded = read_folder(url)
    assert loaded.files == FILES
    assert loaded.meta == {"count": 1, "source": "demo"} == written.meta
    assert loaded.manifest.format == FOLDER.format
    assert is_committed(url) and read_folder_manifest(url) == written
    assert read_verified_file(url, loaded.manifest, "index.json") == FILES["index.json"]


def test_nothing_committed_is_its_own_type(tmp_path: Path) -> None:
    url = str(tmp_path / "never")
    with pytest.raises(NotCommittedError, match=r"no committed folder at .*never"):
        read_folder(url)
    assert not is_committed(url)
    # an uncommitted checkpoint is the same answer, still catchable as CheckpointError
    with pytest.raises(NotCommittedError):
        read_checkpoint(url)
    assert issubclass(NotCommittedError, CheckpointError)


def test_interrupted_commit_is_not_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(tmp_path / "half")

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(commit, "_write_manifest", crash)
    with pytest.raises(RuntimeError):
        commit_folder(url, FILES, {})
    assert storage.exists(storage.join(url, "index.json"))
    with pytest.raises(NotCommittedError):
        read_folder(url)


def test_damage_is_a_commit_error_not_not_committed(tmp_path: Path) -> None:
    url = str(tmp_path / "damaged")
    commit_folder(url, FILES, {})
    (tmp_path / "damaged" / "index.json").write_bytes(b'{"count": 2}')
    with pytest.raises(CommitError, match="folder at .* is corrupt: index.json") as info:
        read_folder(url)
    assert not isinstance(info.value, NotCommittedError)
    (tmp_path / "damaged" / MANIFEST_NAME).write_bytes(b"{")
    assert not is_committed(url)  # invalid counts as "build it again"


def test_a_folder_of_another_kind_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "ckpt")
    commit_checkpoint(url, FILES, meta={"global_step": 1, "task_fingerprint": "f",
                                        "finished": False})
    with pytest.raises(CommitError, match="format 'loraflow-checkpoint/1' is not"):
        read_folder(url, kind=DATASET)
    assert is_committed(url, kind=CHECKPOINT) and not is_committed(url, kind=DATASET)


def test_required_meta_of_a_kind_is_checked_before_anything_is_touched(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    commit_folder(url, FILES, {"content_hash": "abc"}, kind=DATASET)
    for bad in ({}, {"content_hash": 3}, {"files": {}, "content_hash": "x"}):
        with pytest.raises(ValueError):
            commit_folder(url, {"x": b""}, bad, kind=DATASET)
    assert read_folder(url, kind=DATASET).meta == {"content_hash": "abc"}


def test_remove_folder_uncommits_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "gone")
    commit_folder(url, FILES, {})
    removed: list[str] = []
    real_remove = storage.remove
    monkeypatch.setattr(storage, "remove", lambda u, **k: (removed.append(u), real_remove(u)))
    remove_folder(url)
    assert removed[0] == storage.join(url, MANIFEST_NAME)
    assert not (tmp_path / "gone").exists()


# -- the cache on the generic protocol ---------------------------------------------------


def _commit_cache(url: str, fingerprint: str) -> dict[str, torch.Tensor]:
    latents = {"0.0.mean": torch.ones(4, 8, 8), "0.0.std": torch.full((4, 8, 8), 0.5)}
    commit_folder(url, {"latents.safetensors": dump(latents)}, {"fingerprint": fingerprint},
                  kind=CACHE)
    return latents


def test_no_cache_yet_is_none_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        assert open_cache(str(tmp_path / "fp"), "fp") is None
    assert caplog.records == []


def test_no_cache_is_told_by_type_not_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the message says, NotCommittedError means "build it", silently."""

    def not_committed(url: str, **kwargs: object) -> None:
        raise NotCommittedError("a message that mentions nothing known")

    monkeypatch.setattr(cache_module, "read_folder", not_committed)
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        assert open_cache(str(tmp_path / "fp"), "fp") is None
    assert caplog.records == []


def test_committed_cache_opens_and_damage_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = str(tmp_path / "fp")
    latents = _commit_cache(url, "fp")
    manifest = json.loads((tmp_path / "fp" / MANIFEST_NAME).read_text())
    assert "global_step" not in manifest and manifest["fingerprint"] == "fp"

    cache = open_cache(url, "fp")
    assert cache is not None and cache.has_latents and not cache.has_text
    assert torch.equal(cache.latent(0, False)[1], latents["0.0.std"])

    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        assert open_cache(url, "other") is None  # built for another fingerprint
        (tmp_path / "fp" / "latents.safetensors").write_bytes(b"torn")
        assert open_cache(url, "fp") is None
    assert len(caplog.records) == 2 and "rebuilding" in caplog.records[1].getMessage()


def test_a_cache_of_the_old_checkpoint_form_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Caches committed as checkpoints (fake global_step) are refused once, then rebuilt."""
    url = str(tmp_path / "fp")
    commit_checkpoint(url, {"latents.safetensors": dump({"0.0.mean": torch.ones(1)})},
                      meta={"global_step": 0, "task_fingerprint": "fp", "finished": False,
                            "kind": "loraflow-cache/1"})
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        assert open_cache(url, "fp") is None
    assert "format 'loraflow-checkpoint/1'" in caplog.text
    _commit_cache(url, "fp")
    assert open_cache(url, "fp") is not None
