"""The one commit protocol: a folder of named files that exists only once its manifest is.

A committed folder is a directory holding data files and ``manifest.json``. The manifest
is written LAST and is the commit marker:

* a folder is committed only once its manifest is written;
* the manifest lists every file with its size and sha256, carries the caller's small
  ``meta`` dict and a checksum of itself, so readers verify everything and a torn,
  truncated, bit-flipped or hand-edited folder is refused with a message that says what is
  wrong and where;
* rewriting a folder deletes its manifest before touching any data, so nothing
  half-written is ever read as valid, even if the writer dies midway.

Generic form (the cache, prepared datasets, anything else that must appear whole):

* ``commit_folder(url, files, meta, kind=...)`` writes and commits; returns the manifest;
* ``read_folder(url, kind=...)`` reads every file verified -> :class:`Committed`;
  ``read_folder_manifest`` reads only the manifest; ``read_verified_file`` one file;
* ``is_committed(url, kind=...)`` says whether a valid manifest is there;
* "nothing committed here" is :class:`NotCommittedError` (a :class:`CommitError`): callers
  that treat it as "build it" catch that type, never match message text.

A :class:`FolderKind` names the manifest's ``format`` (a reader refuses a folder of another
kind: a dataset is not a checkpoint), the noun messages use, and the meta keys it requires.

Checkpoints are this protocol with kind :data:`CHECKPOINT` (format
``loraflow-checkpoint/1``; meta must hold ``global_step``, ``task_fingerprint`` and
``finished``) plus the ``FINISH`` marker that Crynux nodes poll for, a fingerprint check on
reading, and :func:`list_committed`. Their manifests are byte-for-byte what they always
were: ``{"format", "files", **meta, "manifest_sha256"}``, indented, keys sorted.

Segments are killed at arbitrary moments (time boxes, preemption); the next one must either
resume from a complete checkpoint or know there is none. Storage outages surface as
:class:`engine.store.storage.StorageError`, never as "not committed", so an outage cannot
silently restart training from scratch (or rebuild a cache).

Why one module over 400 lines: the generic protocol and its checkpoint layer share every
step (a split would import in a circle or copy them), and tests interrupt a commit between
its steps by patching this module's functions.
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
    "CHECKPOINT", "FINISH_NAME", "FOLDER", "FORMAT", "MANIFEST_NAME", "CheckpointError",
    "CheckpointManifest", "CommitError", "Committed", "FolderKind", "LoadedCheckpoint",
    "Manifest", "NotCommittedError", "commit_checkpoint", "commit_folder", "is_committed",
    "is_finished", "list_committed", "read_checkpoint", "read_folder", "read_folder_manifest",
    "read_manifest", "read_verified_file", "remove_checkpoint", "remove_folder",
    "write_finish_marker",
]

MANIFEST_NAME = "manifest.json"
#: Empty file Crynux nodes poll for to know a task's result is complete.
FINISH_NAME = "FINISH"
#: Manifest keys owned by this module; ``meta`` may not override them.
_RESERVED_KEYS = frozenset({"format", "files", "manifest_sha256"})
_RESERVED_NAMES = frozenset({MANIFEST_NAME, FINISH_NAME})


@dataclass(frozen=True)
class FolderKind:
    """What a committed folder is: its manifest ``format``, its name in messages, and the
    meta keys (with their types) that every manifest of this kind must carry."""

    format: str
    noun: str
    required: Mapping[str, type] = field(default_factory=dict)


#: A plain committed folder (no required meta).
FOLDER = FolderKind("loraflow-folder/1", "folder")
#: A training checkpoint.
CHECKPOINT = FolderKind(
    "loraflow-checkpoint/1",
    "checkpoint",
    {"global_step": int, "task_fingerprint": str, "finished": bool},
)
FORMAT = CHECKPOINT.format


class CommitError(LoraflowError, ValueError):
    """A committed folder is missing, corrupt, of another kind, or belongs to another task.

    The message says what is wrong and at which URL, so callers can log it as-is.
    """


#: The name checkpoint code has always caught; the same class.
CheckpointError = CommitError


class NotCommittedError(CommitError):
    """Nothing is committed at the URL (no manifest: never written, or the write never
    finished). An answer, not damage: a cache or dataset is then simply built."""


class Manifest(dict):
    """The parsed ``manifest.json``: a plain dict with typed accessors.

    A dict (not a frozen dataclass) because ``meta`` is open-ended: callers add their own
    keys (epoch, sample offset, RNG seeds) and read them back without a schema change here.
    """

    @property
    def format(self) -> str:
        return str(self["format"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """``{name: {"size": int, "sha256": hex}}`` for every data file."""
        return dict(self["files"])

    @property
    def meta(self) -> dict[str, Any]:
        """The caller's keys: everything but ``format``, ``files`` and the checksum."""
        return {k: v for k, v in self.items() if k not in _RESERVED_KEYS}


class CheckpointManifest(Manifest):
    """A checkpoint's manifest: the three keys every checkpoint carries, typed."""

    @property
    def global_step(self) -> int:
        return int(self["global_step"])

    @property
    def finished(self) -> bool:
        return bool(self["finished"])

    @property
    def task_fingerprint(self) -> str:
        return str(self["task_fingerprint"])


@dataclass(frozen=True)
class Committed:
    """A committed folder whose files were all read and verified against its manifest.

    Files are held in memory: what is committed this way is small (LoRA weights, optimizer
    moments, cached embeddings), and verifying while reading means nothing unverified
    ever reaches the caller.
    """

    url: str
    manifest: Manifest
    files: dict[str, bytes] = field(repr=False)

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.meta


@dataclass(frozen=True)
class LoadedCheckpoint(Committed):
    """A verified checkpoint (see :class:`Committed`)."""

    manifest: CheckpointManifest

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


def _is(value: Any, kind: type) -> bool:
    """isinstance, except that a bool is not an int (JSON true is not a step number)."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_file_name(name: str, kind: FolderKind) -> None:
    """Names are ``file`` or ``folder/file``; nothing that escapes or shadows our markers."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ValueError(f"invalid {kind.noun} file name {name!r}")
    parts = name.split("/")
    if len(parts) > 2 or any(part in {"", ".", ".."} for part in parts):
        raise ValueError(
            f"invalid {kind.noun} file name {name!r}: use 'file' or 'folder/file' (one level)"
        )
    if name in _RESERVED_NAMES or storage.TEMP_MARKER in name:
        raise ValueError(f"{kind.noun} file name {name!r} is reserved")


def _check_commit(files: Mapping[str, bytes], meta: Mapping[str, Any], kind: FolderKind) -> None:
    """Fail before anything is deleted, so a bad call cannot uncommit a good folder."""
    for name in files:
        _check_file_name(name, kind)
    clash = _RESERVED_KEYS.intersection(meta)
    if clash:
        raise ValueError(f"meta may not set reserved manifest keys: {sorted(clash)}")
    for key, expected in kind.required.items():
        if key not in meta:
            raise ValueError(f"meta must contain {key!r}")
        if not _is(meta[key], expected):
            raise ValueError(f"meta[{key!r}] must be {expected.__name__}, got {meta[key]!r}")
    try:
        _canonical(dict(meta))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta must be JSON-serialisable: {exc}") from exc


def _validate_manifest(url: str, document: Any, kind: FolderKind) -> Manifest:
    """Structural checks plus the self-checksum; raises CommitError naming ``url``."""
    where = storage.redact(url)

    def invalid(why: str) -> CommitError:
        return CommitError(f"{kind.noun} at {where} has an invalid manifest: {why}")

    if not isinstance(document, dict):
        raise invalid("not a JSON object")
    if document.get("format") != kind.format:
        raise invalid(f"format {document.get('format')!r} is not {kind.format!r}")
    expected = document.get("manifest_sha256")
    if not isinstance(expected, str) or expected != _manifest_checksum(document):
        raise CommitError(
            f"{kind.noun} at {where} is corrupt: {MANIFEST_NAME} was modified after it was "
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
    for key, kind_of_value in kind.required.items():
        if not _is(document.get(key), kind_of_value):
            raise invalid(f"{key!r} missing or not {kind_of_value.__name__}")
    return Manifest(document)


# ---------------------------------------------------------------------------------------------
# Writing: the steps of a commit, separate so tests can interrupt between them
# ---------------------------------------------------------------------------------------------


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
    """The commit point: once this write lands, the folder is committed."""
    payload = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    storage.write_bytes(storage.join(url, MANIFEST_NAME), payload)


def _commit(
    url: str, files: Mapping[str, bytes], meta: Mapping[str, Any], kind: FolderKind
) -> dict[str, Any]:
    """Uncommit, clear stale files, write data, write the manifest; inputs already checked."""
    storage.remove(storage.join(url, MANIFEST_NAME))  # from here on, nothing is committed
    _remove_stale(url, keep=set(files))
    entries = _write_data_files(url, files)
    document: dict[str, Any] = {"format": kind.format, "files": entries, **meta}
    document["manifest_sha256"] = _manifest_checksum(document)
    _write_manifest(url, document)
    return json.loads(_canonical(document))


def commit_folder(
    url: str,
    files: Mapping[str, bytes],
    meta: Mapping[str, Any] | None = None,
    *,
    kind: FolderKind = FOLDER,
) -> Manifest:
    """Write ``files`` into the folder ``url`` and commit them with a manifest.

    Order (each step only after the previous one succeeded): validate inputs; delete an
    existing manifest (the folder is uncommitted from that moment); delete stale files not
    in ``files``; write the data files; write ``manifest.json``. A crash anywhere leaves
    either the new folder or nothing committed at ``url``, never a mix that verifies.

    ``meta`` holds small JSON-serialisable values stored in the manifest (``kind.required``
    keys must be there). Names may be ``file`` or ``folder/file``. Returns the manifest.
    """
    meta = dict(meta or {})
    _check_commit(files, meta, kind)
    return Manifest(_commit(url, files, meta, kind))


def remove_folder(url: str) -> None:
    """Delete the folder at ``url``: uncommit it first, then delete its files.

    A plain recursive delete removes files in directory order, so a process killed midway
    could leave a manifest over missing data files. Deleting the manifest first means a
    half-deleted folder is simply an uncommitted one.
    """
    storage.remove(storage.join(url, MANIFEST_NAME))
    storage.remove_tree(url)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_folder_manifest(url: str, *, kind: FolderKind = FOLDER) -> Manifest:
    """Read and validate ``manifest.json`` only (no data files): cheap, for listings.

    Raises :class:`NotCommittedError` when there is no manifest, :class:`CommitError` when
    it is invalid or of another kind; storage outages raise ``StorageError``.
    """
    where = storage.redact(url)
    try:
        raw = storage.read_bytes(storage.join(url, MANIFEST_NAME))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise NotCommittedError(
            f"no committed {kind.noun} at {where} "
            f"({MANIFEST_NAME} missing: the write never finished)"
        ) from exc
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommitError(
            f"{kind.noun} at {where} has an invalid manifest: {MANIFEST_NAME} is not valid "
            f"JSON ({exc})"
        ) from exc
    return _validate_manifest(url, document, kind)


def read_verified_file(
    url: str, manifest: Manifest, name: str, *, kind: FolderKind = FOLDER
) -> bytes:
    """One file of the committed folder at ``url``, checked against ``manifest``."""
    where = storage.redact(url)
    entry = manifest.files.get(name)
    if entry is None:
        raise CommitError(f"{kind.noun} at {where} has no file {name!r} in its manifest")
    try:
        data = storage.read_bytes(storage.join(url, name))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise CommitError(f"{kind.noun} at {where} is corrupt: {name} is missing") from exc
    if len(data) != entry["size"]:
        raise CommitError(
            f"{kind.noun} at {where} is corrupt: {name} size mismatch "
            f"(manifest says {entry['size']} bytes, found {len(data)})"
        )
    if _sha256(data) != entry["sha256"]:
        raise CommitError(f"{kind.noun} at {where} is corrupt: {name} sha256 mismatch")
    return data


def _read_all(url: str, manifest: Manifest, kind: FolderKind) -> dict[str, bytes]:
    names = sorted(manifest.files)
    return {name: read_verified_file(url, manifest, name, kind=kind) for name in names}


def read_folder(url: str, *, kind: FolderKind = FOLDER) -> Committed:
    """Read the committed folder at ``url`` and verify every file against its manifest."""
    manifest = read_folder_manifest(url, kind=kind)
    return Committed(url=url, manifest=manifest, files=_read_all(url, manifest, kind))


def is_committed(url: str, *, kind: FolderKind = FOLDER) -> bool:
    """Whether a valid manifest of ``kind`` is at ``url`` (data files are not read).

    An invalid manifest counts as not committed (the caller rebuilds); an outage raises.
    """
    try:
        read_folder_manifest(url, kind=kind)
    except CommitError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Checkpoints: the protocol with kind CHECKPOINT, the FINISH marker and a fingerprint check
# ---------------------------------------------------------------------------------------------


def commit_checkpoint(
    url: str, files: Mapping[str, bytes], *, meta: Mapping[str, Any]
) -> CheckpointManifest:
    """Commit a checkpoint (see :func:`commit_folder`), then FINISH if ``meta["finished"]``.

    The FINISH marker is deleted before the manifest (it implies one: reverse order of
    writing), so a crash anywhere leaves the new checkpoint or none. ``meta`` must carry
    ``global_step`` (int >= 0), ``task_fingerprint`` (str) and ``finished`` (bool); any
    other JSON-serialisable keys are stored too. Returns the manifest as written.
    """
    _check_commit(files, meta, CHECKPOINT)
    if meta["global_step"] < 0:
        raise ValueError("meta['global_step'] must be >= 0")
    storage.remove(storage.join(url, FINISH_NAME))
    manifest = CheckpointManifest(_commit(url, files, meta, CHECKPOINT))
    if manifest.finished:
        write_finish_marker(url)
    return manifest


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
    """Delete the checkpoint at ``url``: FINISH, then the manifest, then its files.

    A half-deleted checkpoint is then simply an uncommitted directory (never listed by
    :func:`list_committed` over missing data files).
    """
    storage.remove(storage.join(url, FINISH_NAME))
    remove_folder(url)


def is_finished(url: str) -> bool:
    """Whether the ``FINISH`` marker exists (it is only ever written after the manifest)."""
    return storage.exists(storage.join(url, FINISH_NAME))


def read_manifest(url: str) -> CheckpointManifest:
    """A checkpoint's validated manifest (see :func:`read_folder_manifest`)."""
    return CheckpointManifest(read_folder_manifest(url, kind=CHECKPOINT))


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
    files = _read_all(url, manifest, CHECKPOINT)
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
