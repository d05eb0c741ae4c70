"""Atomic, verified checkpoints on fsspec storage (local disk, S3, memory).

A checkpoint is a directory holding data files (LoRA weights, optimizer moments, RNG state,
...) and ``manifest.json``. The manifest is written LAST and is the commit marker:

* a checkpoint exists only once its manifest is written;
* the manifest lists every file with its size and sha256, and carries a checksum of itself,
  so readers verify everything and a torn, truncated, bit-flipped or hand-edited checkpoint
  is refused with a message that says what is wrong and where;
* rewriting a directory deletes its manifest (and ``FINISH`` marker) before touching any data,
  so nothing half-written is ever read as valid, even if the writer dies midway.

Segments of a training run are killed at arbitrary moments (time boxes, preemption); the next
segment must either resume from a complete checkpoint or know there is none. Storage outages
surface as :class:`engine.store.storage.StorageError`, never as "no checkpoint", so an outage can
not silently restart training from scratch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import LoraflowError
from engine.store import storage

__all__ = [
    "FINISH_NAME",
    "FORMAT",
    "MANIFEST_NAME",
    "CheckpointError",
    "CheckpointManifest",
    "LoadedCheckpoint",
    "commit_checkpoint",
    "is_finished",
    "list_committed",
    "read_checkpoint",
    "read_manifest",
    "remove_checkpoint",
    "write_finish_marker",
]

FORMAT = "loraflow-checkpoint/1"
MANIFEST_NAME = "manifest.json"
#: Empty file Crynux nodes poll for to know a task's result is complete.
FINISH_NAME = "FINISH"
#: Manifest keys owned by this module; ``meta`` may not override them.
_RESERVED_KEYS = frozenset({"format", "files", "manifest_sha256"})
_RESERVED_NAMES = frozenset({MANIFEST_NAME, FINISH_NAME})
_REQUIRED_META: dict[str, type | tuple[type, ...]] = {
    "global_step": int,
    "task_fingerprint": str,
    "finished": bool,
}


class CheckpointError(LoraflowError, ValueError):
    """A checkpoint is missing, uncommitted, corrupt, or belongs to another task.

    The message says what is wrong and at which URL, so callers can log it as-is.
    """


class CheckpointManifest(dict):
    """The parsed ``manifest.json``: a plain dict with typed accessors for the core fields.

    A dict (not a frozen dataclass) because ``meta`` is open-ended: callers add their own
    keys (epoch, sample offset, RNG seeds) and read them back without a schema change here.
    """

    @property
    def format(self) -> str:
        return str(self["format"])

    @property
    def global_step(self) -> int:
        return int(self["global_step"])

    @property
    def finished(self) -> bool:
        return bool(self["finished"])

    @property
    def task_fingerprint(self) -> str:
        return str(self["task_fingerprint"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """``{name: {"size": int, "sha256": hex}}`` for every data file."""
        return dict(self["files"])


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A committed checkpoint whose files were all read and verified against its manifest.

    Files are held in memory: checkpoints are small (LoRA weights plus optimizer moments), and
    verifying while reading means nothing unverified ever reaches the trainer.
    """

    url: str
    manifest: CheckpointManifest
    files: dict[str, bytes] = field(repr=False)

    @property
    def global_step(self) -> int:
        return self.manifest.global_step

    @property
    def finished(self) -> bool:
        return self.manifest.finished

    @property
    def task_fingerprint(self) -> str:
        return self.manifest.task_fingerprint


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(document: Mapping[str, Any]) -> bytes:
    """Stable JSON encoding, so the manifest checksum does not depend on key order."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _manifest_checksum(document: Mapping[str, Any]) -> str:
    return _sha256(_canonical({k: v for k, v in document.items() if k != "manifest_sha256"}))


def _check_file_name(name: str) -> None:
    """Names are ``file`` or ``folder/file``; nothing that escapes or shadows our markers."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ValueError(f"invalid checkpoint file name {name!r}")
    parts = name.split("/")
    if len(parts) > 2 or any(part in {"", ".", ".."} for part in parts):
        raise ValueError(
            f"invalid checkpoint file name {name!r}: use 'file' or 'folder/file' (one level)"
        )
    if name in _RESERVED_NAMES or storage.TEMP_MARKER in name:
        raise ValueError(f"checkpoint file name {name!r} is reserved")


def _check_meta(meta: Mapping[str, Any]) -> None:
    """Fail before anything is deleted, so a bad call cannot uncommit a good checkpoint."""
    clash = _RESERVED_KEYS.intersection(meta)
    if clash:
        raise ValueError(f"meta may not set reserved manifest keys: {sorted(clash)}")
    for key, kind in _REQUIRED_META.items():
        if key not in meta:
            raise ValueError(f"meta must contain {key!r}")
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"meta[{key!r}] must be {kind.__name__}, got {value!r}")
    if meta["global_step"] < 0:
        raise ValueError("meta['global_step'] must be >= 0")
    try:
        _canonical(dict(meta))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta must be JSON-serialisable: {exc}") from exc


def _validate_manifest(url: str, document: Any) -> CheckpointManifest:
    """Structural checks plus the self-checksum; raises CheckpointError naming ``url``."""
    where = storage.redact(url)

    def invalid(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint at {where} has an invalid manifest: {why}")

    if not isinstance(document, dict):
        raise invalid("not a JSON object")
    if document.get("format") != FORMAT:
        raise invalid(f"format {document.get('format')!r} is not {FORMAT!r}")
    expected = document.get("manifest_sha256")
    if not isinstance(expected, str) or expected != _manifest_checksum(document):
        raise CheckpointError(
            f"checkpoint at {where} is corrupt: {MANIFEST_NAME} was modified after it was "
            "written (manifest_sha256 mismatch)"
        )
    files = document.get("files")
    if not isinstance(files, dict):
        raise invalid("'files' is not an object")
    for name, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise invalid(f"entry for {name!r} needs integer 'size' and string 'sha256'")
    for key, kind in _REQUIRED_META.items():
        value = document.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise invalid(f"{key!r} missing or not {kind.__name__}")
    return CheckpointManifest(document)


# ---------------------------------------------------------------------------------------------
# Writing: the steps of commit_checkpoint, separate so tests can interrupt between them
# ---------------------------------------------------------------------------------------------


def _uncommit(url: str) -> None:
    """Delete FINISH, then the manifest: from here on the directory is not a checkpoint.

    FINISH goes first because it implies a manifest (reverse order of writing), and both go
    before any data file is touched.
    """
    storage.remove(storage.join(url, FINISH_NAME))
    storage.remove(storage.join(url, MANIFEST_NAME))


def _remove_stale(url: str, keep: set[str]) -> None:
    """Delete leftovers of an earlier aborted write (old files, temporaries) not in ``keep``."""
    for name in storage.list_files(url):
        if name not in keep:
            storage.remove(storage.join(url, name))


def _write_data_files(url: str, files: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """Write each data file atomically; return its manifest entries (from the bytes we hold)."""
    entries: dict[str, dict[str, Any]] = {}
    for name in sorted(files):
        data = bytes(files[name])
        storage.write_bytes(storage.join(url, name), data)
        entries[name] = {"size": len(data), "sha256": _sha256(data)}
    return entries


def _write_manifest(url: str, document: dict[str, Any]) -> None:
    """The commit point: once this write lands, the checkpoint exists."""
    payload = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    storage.write_bytes(storage.join(url, MANIFEST_NAME), payload)


def _build_manifest(entries: dict[str, dict[str, Any]], meta: Mapping[str, Any]) -> dict:
    document: dict[str, Any] = {"format": FORMAT, "files": entries, **meta}
    document["manifest_sha256"] = _manifest_checksum(document)
    return document


def commit_checkpoint(
    url: str, files: Mapping[str, bytes], *, meta: Mapping[str, Any]
) -> CheckpointManifest:
    """Write ``files`` into the directory ``url`` and commit them with a manifest.

    Order (each step only after the previous one succeeded): validate inputs; delete an
    existing FINISH marker and manifest (the directory is uncommitted from that moment);
    delete stale files not in ``files``; write the data files; write ``manifest.json``; if
    ``meta["finished"]``, write the FINISH marker. A crash anywhere leaves either the new
    checkpoint or no checkpoint at ``url``, never a mix that verifies.

    ``meta`` must carry ``global_step`` (int), ``task_fingerprint`` (str) and ``finished``
    (bool); any other JSON-serialisable keys are stored too. Names may be ``file`` or
    ``folder/file``. Returns the manifest as written.
    """
    for name in files:
        _check_file_name(name)
    _check_meta(meta)
    _uncommit(url)
    _remove_stale(url, keep=set(files))
    entries = _write_data_files(url, files)
    document = _build_manifest(entries, meta)
    _write_manifest(url, document)
    if document["finished"]:
        write_finish_marker(url)
    return CheckpointManifest(json.loads(_canonical(document)))


def write_finish_marker(url: str) -> None:
    """Write the empty ``FINISH`` file that Crynux nodes poll for.

    Only for a committed, finished checkpoint: the marker must never point at something a
    reader would refuse.
    """
    manifest = read_manifest(url)
    if not manifest.finished:
        raise CheckpointError(
            f"checkpoint at {storage.redact(url)} is not finished (global_step "
            f"{manifest.global_step}); refusing to write {FINISH_NAME}"
        )
    storage.write_bytes(storage.join(url, FINISH_NAME), b"")


def remove_checkpoint(url: str) -> None:
    """Delete the checkpoint at ``url``: uncommit it first, then delete its files.

    A plain recursive delete removes files in directory order, so a process killed midway
    could leave a manifest over missing data files (listed by :func:`list_committed`,
    refused by :func:`read_checkpoint`). Deleting FINISH and the manifest first means a
    half-deleted checkpoint is simply an uncommitted directory.
    """
    _uncommit(url)
    storage.remove_tree(url)


def is_finished(url: str) -> bool:
    """Whether the ``FINISH`` marker exists (it is only ever written after the manifest)."""
    return storage.exists(storage.join(url, FINISH_NAME))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_manifest(url: str) -> CheckpointManifest:
    """Read and validate ``manifest.json`` only (no data files): cheap, for listings.

    Raises CheckpointError if there is no committed checkpoint or the manifest is invalid;
    storage outages raise :class:`engine.store.storage.StorageError`.
    """
    where = storage.redact(url)
    try:
        raw = storage.read_bytes(storage.join(url, MANIFEST_NAME))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise CheckpointError(
            f"no committed checkpoint at {where} "
            f"({MANIFEST_NAME} missing: the write never finished)"
        ) from exc
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint at {where} has an invalid manifest: {MANIFEST_NAME} is not valid JSON "
            f"({exc})"
        ) from exc
    return _validate_manifest(url, document)


def _read_verified(url: str, name: str, entry: Mapping[str, Any]) -> bytes:
    where = storage.redact(url)
    try:
        data = storage.read_bytes(storage.join(url, name))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise CheckpointError(f"checkpoint at {where} is corrupt: {name} is missing") from exc
    if len(data) != entry["size"]:
        raise CheckpointError(
            f"checkpoint at {where} is corrupt: {name} size mismatch "
            f"(manifest says {entry['size']} bytes, found {len(data)})"
        )
    if _sha256(data) != entry["sha256"]:
        raise CheckpointError(f"checkpoint at {where} is corrupt: {name} sha256 mismatch")
    return data


def read_checkpoint(url: str, *, expected_fingerprint: str | None = None) -> LoadedCheckpoint:
    """Read the checkpoint at ``url`` and verify every file against its manifest.

    With ``expected_fingerprint``, also refuse a checkpoint written for another task (model,
    dataset or LoRA shape changed): resuming it would silently train the wrong thing.
    """
    manifest = read_manifest(url)
    if expected_fingerprint is not None and manifest.task_fingerprint != expected_fingerprint:
        raise CheckpointError(
            f"checkpoint at {storage.redact(url)} belongs to a different task "
            f"(model/dataset/LoRA shape changed): fingerprint {manifest.task_fingerprint} "
            f"!= {expected_fingerprint}"
        )
    files = {
        name: _read_verified(url, name, entry) for name, entry in sorted(manifest.files.items())
    }
    return LoadedCheckpoint(url=url, manifest=manifest, files=files)


def list_committed(root: str) -> list[str]:
    """URLs of child directories of ``root`` holding a valid manifest, oldest step first.

    Only manifests are checked (cheap); data files are verified by :func:`read_checkpoint`,
    so a caller falling back to "the newest good one" walks this list from the end. Ties in
    ``global_step`` are ordered by URL. Uncommitted or invalid directories are skipped;
    storage outages raise rather than returning a misleadingly short list.
    """
    found: list[tuple[int, str]] = []
    for child in storage.list_dirs(root):
        try:
            manifest = read_manifest(child)
        except CheckpointError:
            continue
        found.append((manifest.global_step, child))
    return [url for _, url in sorted(found)]
