"""Small fsspec helpers: one place that decides how loraflow talks to storage.

Checkpoints move between segments through local disk or an object store (S3). Every
caller goes through these helpers so that three properties hold everywhere:

* **No torn files.** A single file is either absent or complete. On local disk we write a
  temporary name beside the target and rename it (POSIX rename is atomic); on object stores
  one PUT is already atomic, so we write the key directly (a rename there is copy+delete,
  which is neither atomic nor cheap).
* **Bounded, visible retries.** Transient failures (connection refused, timeouts, 5xx
  answers) are retried with exponential backoff whose total wait is capped, and then surface
  as one :class:`StorageError` naming the URL. Disk full and permission errors are not
  transient and fail at once. Retries inside s3fs/botocore are switched off so that our
  policy is the only one and its bound is real.
* **No credentials in URLs or messages.** S3 credentials come only from the environment
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, which s3fs and
  botocore read themselves). URLs with embedded credentials are refused, and every message
  we build is passed through :func:`redact` (the one policy, in :mod:`engine.store.redact`).

s3fs caches directory listings per filesystem instance, so a reader could miss a manifest
that another process wrote after the listing was cached. We create S3 filesystems with the
listings cache off and additionally invalidate before listing, so a reader always sees the
newest state.

Why one module over 400 lines: the operations, the retry loop they all run in and the
filesystem options are one concept (how loraflow talks to storage), and the retry policy is
a module-level setting that every operation must see.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol, url_to_fs

from engine.errors import ExitCode, LoraflowError
from engine.store.redact import has_userinfo, redact

__all__ = [
    "DEFAULT_RETRY",
    "RetryPolicy",
    "StorageError",
    "basename",
    "clear_filesystem_cache",
    "exists",
    "filesystem",
    "join",
    "list_dirs",
    "list_files",
    "read_bytes",
    "read_range",
    "read_stream",
    "redact",
    "set_default_retry_policy",
    "remove",
    "remove_tree",
    "write_bytes",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Protocols whose ``mv`` is an atomic rename: write a temporary file, then rename it.
_RENAME_PROTOCOLS = frozenset({"file", "local"})
#: Protocols where one PUT is atomic (and rename is copy+delete): write the target directly.
_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
_S3_PROTOCOLS = frozenset({"s3", "s3a"})

#: Per-attempt network timeouts for S3, so one hung request cannot defeat the retry bound.
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 60.0

#: Marker in temporary names, so stale temporaries are recognisable (and cleaned up).
TEMP_MARKER = ".loraflow-tmp-"

# Errors that are answers, not failures: callers branch on them, so they pass through as-is.
_ANSWER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
)
# errno values that retrying cannot fix; they become a StorageError at once.
_FATAL_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on device (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EROFS: "read-only file system (EROFS)",
    errno.EFBIG: "file too large (EFBIG)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.ENAMETOOLONG: "file name too long (ENAMETOOLONG)",
}


class StorageError(LoraflowError, OSError):
    """Storage could not be reached or used for ``url``, after retries where they make sense.

    An ``OSError`` so that generic I/O handlers still catch it; ``errno`` is kept from the
    underlying error (e.g. ``ENOSPC``) where there was one. The message never contains
    credentials.
    """

    exit_code = ExitCode.STORAGE

    def __init__(
        self, message: str, *, url: str = "", attempts: int = 1, cause_errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.url = redact(url)
        self.attempts = attempts
        if cause_errno is not None:
            self.errno = cause_errno

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with url/attempts/errno intact: orchestrators ship errors between processes.
        state = {"url": self.url, "attempts": self.attempts, "errno": self.errno}
        return (type(self), (str(self),), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url = state["url"]
        self.attempts = state["attempts"]
        self.errno = state["errno"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry transient storage errors.

    The defaults (5 attempts; waits 0.5, 1, 2, 4 s = 7.5 s, never more than 10 s in total)
    ride out an S3 endpoint restarting or a brief network blip, yet report a real outage
    within seconds so the orchestrator can reschedule the segment instead of hanging.
    """

    attempts: int = 5
    initial_delay_s: float = 0.5
    multiplier: float = 2.0
    max_total_wait_s: float = 10.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.initial_delay_s < 0 or self.multiplier < 1 or self.max_total_wait_s < 0:
            raise ValueError("RetryPolicy delays must be >= 0 and multiplier >= 1")

    def delays(self) -> list[float]:
        """The waits between attempts, already capped so their sum stays within the bound."""
        result: list[float] = []
        total = 0.0
        delay = self.initial_delay_s
        for _ in range(self.attempts - 1):
            step = max(0.0, min(delay, self.max_total_wait_s - total))
            result.append(step)
            total += step
            delay *= self.multiplier
        return result


DEFAULT_RETRY = RetryPolicy()


def set_default_retry_policy(policy: RetryPolicy) -> RetryPolicy:
    """Replace the policy used when callers pass none (e.g. from CLI options); returns the old.

    Checkpoint functions do not take a policy argument; this is how their retries are tuned.
    """
    global DEFAULT_RETRY
    previous, DEFAULT_RETRY = DEFAULT_RETRY, policy
    return previous


# ---------------------------------------------------------------------------------------------
# URL helpers (redaction lives in engine.store.redact; ``redact`` is re-exported here)
# ---------------------------------------------------------------------------------------------


def _protocol(url: str) -> str:
    """The outermost protocol of ``url``; plain paths are ``file``."""
    return split_protocol(url)[0] or "file"


def _refuse_credentials(url: str) -> None:
    """Credentials belong in the environment; a URL ends up in logs and manifests."""
    if has_userinfo(url):
        raise ValueError(
            f"credentials must not be embedded in storage URLs ({redact(url)}); "
            "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment instead"
        )


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL (``file://``, ``s3://``, ``memory://``).

    Always uses ``/``: fsspec paths are POSIX-style for every protocol, including local.
    Empty parts are skipped; surrounding slashes on parts are ignored.
    """
    result = str(url)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        if result.endswith("://") or result.endswith("/"):
            result = result + part
        elif result == "":
            result = part
        else:
            result = result + "/" + part
    return result


def basename(url: str) -> str:
    """Last path component of a URL or path (ignoring a trailing slash)."""
    return posixpath.basename(str(url).rstrip("/"))


# ---------------------------------------------------------------------------------------------
# Filesystems
# ---------------------------------------------------------------------------------------------


def _storage_options(protocol: str) -> dict[str, Any]:
    """Options per protocol; never credentials (those come from the environment)."""
    if protocol in _S3_PROTOCOLS:
        return {
            # A reader must see a manifest written by another process a moment ago.
            "use_listings_cache": False,
            # One attempt per call inside botocore: our RetryPolicy owns retrying.
            "config_kwargs": {
                "retries": {"total_max_attempts": 1, "mode": "standard"},
                "connect_timeout": S3_CONNECT_TIMEOUT_S,
                "read_timeout": S3_READ_TIMEOUT_S,
            },
        }
    if protocol in _RENAME_PROTOCOLS:
        return {"auto_mkdir": True}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``url`` via :func:`fsspec.core.url_to_fs`.

    S3 filesystems get the listings cache and the library-internal retries switched off
    (see module docstring). Instances are cached by fsspec; if the ``AWS_*`` environment
    changes at run time (tests starting a server), call :func:`clear_filesystem_cache`.
    """
    url = str(url)
    _refuse_credentials(url)
    protocol = _protocol(url)
    options = {} if "::" in url else _storage_options(protocol)
    fs, path = url_to_fs(url, **options)
    if protocol in _S3_PROTOCOLS and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop; ours is bounded and reports the URL
    return fs, path


def clear_filesystem_cache() -> None:
    """Forget cached filesystem instances, e.g. after the ``AWS_*`` environment changed."""
    try:
        import s3fs
    except ImportError:  # pragma: no cover - s3fs is a dependency
        return
    s3fs.S3FileSystem.clear_instance_cache()


def _fs_protocol(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


# ---------------------------------------------------------------------------------------------
# Retry machinery
# ---------------------------------------------------------------------------------------------


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types worth retrying: network and server-side trouble.

    Computed on first error, so importing this module does not import botocore/aiohttp.
    """
    types: list[type[BaseException]] = [OSError, TimeoutError, asyncio.TimeoutError]
    try:
        from botocore import exceptions as bce

        types += [bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError]
    except ImportError:  # pragma: no cover - s3fs is a dependency, botocore comes with it
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _fatal_reason(exc: BaseException) -> str | None:
    """Why ``exc`` cannot be fixed by retrying, or None if it may be transient."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and exc.errno in _FATAL_ERRNOS:
        return _FATAL_ERRNOS[exc.errno]
    try:
        from botocore import exceptions as bce
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, bce.NoCredentialsError):
        return "no S3 credentials (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if isinstance(exc, bce.BotoCoreError) and not isinstance(exc, _transient_types()):
        return "S3 client error"
    return None


def _describe(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")


def _with_retries(op: str, url: str, fn: Callable[[], T], retry: RetryPolicy | None) -> T:
    """Run ``fn``; retry transient errors per ``retry``; raise StorageError when exhausted."""
    policy = retry if retry is not None else DEFAULT_RETRY
    delays = policy.delays()
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except _ANSWER_ERRORS:
            raise
        except Exception as exc:
            reason = _fatal_reason(exc)
            if reason is not None:
                raise StorageError(
                    f"cannot {op} {redact(url)}: {reason}; not retried ({_describe(exc)})",
                    url=url,
                    attempts=attempt,
                    cause_errno=getattr(exc, "errno", None),
                ) from exc
            if not isinstance(exc, _transient_types()):
                raise  # a bug, not a storage problem: keep the original traceback
            if attempt > len(delays):
                elapsed = time.monotonic() - started
                raise StorageError(
                    f"cannot {op} {redact(url)}: storage unavailable after {attempt} "
                    f"attempt(s) over {elapsed:.1f}s ({_describe(exc)})",
                    url=url,
                    attempts=attempt,
                    cause_errno=getattr(exc, "errno", None),
                ) from exc
            delay = delays[attempt - 1]
            logger.warning(
                "storage: %s %s failed (attempt %d/%d, retrying in %.1fs): %s",
                op,
                redact(url),
                attempt,
                len(delays) + 1,
                delay,
                _describe(exc),
            )
            policy.sleep(delay)


# ---------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------


def _temp_path(path: str) -> str:
    """Hidden temporary name in the same directory, so the rename stays on one filesystem."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")


def _fsync_quietly(handle: Any) -> None:
    """Flush a local file to disk before the rename publishes it (best effort)."""
    try:
        handle.flush()
        os.fsync(handle.fileno())
    except (AttributeError, OSError, ValueError):
        pass


def _fsync_directory(path: str) -> None:
    """Make a rename durable across power loss, not just process death (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _put_once(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One attempt at writing ``data`` to ``path`` so readers never see a partial file."""
    protocol = _fs_protocol(fs)
    if protocol in _PUT_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    temp = _temp_path(path)
    try:
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(temp, "wb") as handle:
            handle.write(data)
            if protocol in _RENAME_PROTOCOLS:
                _fsync_quietly(handle)
        fs.mv(temp, path)
        if protocol in _RENAME_PROTOCOLS:
            _fsync_directory(parent)
    except BaseException:
        with contextlib.suppress(Exception):  # cleanup must not mask the real error
            if fs.exists(temp):
                fs.rm_file(temp)
        raise


def write_bytes(url: str, data: bytes, *, retry: RetryPolicy | None = None) -> None:
    """Write ``data`` to ``url`` atomically (complete or absent), with bounded retries."""
    fs, path = filesystem(url)
    payload = bytes(data)
    _with_retries("write", url, lambda: _put_once(fs, path, payload), retry)


def read_bytes(url: str, *, retry: RetryPolicy | None = None, limit: int | None = None) -> bytes:
    """Read the object at ``url`` (its first ``limit`` bytes if given, so a caller with a size
    cap never holds more). A missing file raises ``FileNotFoundError``."""
    fs, path = filesystem(url)
    if limit is None:
        return _with_retries("read", url, lambda: fs.cat_file(path), retry)

    def head() -> bytes:
        # open + read rather than a ranged cat: S3 answers a range on an empty object with
        # 416, where a reader wants b"" (and then a clear "empty document" message)
        with fs.open(path, "rb") as handle:
            return handle.read(limit)

    return _with_retries("read", url, head, retry)


def read_range(url: str, start: int, length: int, *, retry: RetryPolicy | None = None) -> bytes:
    """``length`` bytes of the file at ``url`` from offset ``start`` (one ranged GET on S3),
    for one member of a file too big to fetch (a webdataset shard). Fewer bytes come back
    where the file ends sooner: the caller checks. A missing file raises
    ``FileNotFoundError``."""
    fs, path = filesystem(url)
    end = start + length
    return _with_retries("read", url, lambda: fs.cat_file(path, start=start, end=end), retry)


def _invalidate(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop cached listings so the next call asks the storage (s3fs caches them)."""
    with contextlib.suppress(Exception):  # caching is an optimisation, never a failure
        fs.invalidate_cache(path)


def exists(url: str, *, retry: RetryPolicy | None = None) -> bool:
    """Whether a file or directory exists at ``url``; storage outages raise, never ``False``.

    (fsspec's generic ``exists`` swallows every error; an outage read as "no checkpoint"
    would restart training from scratch, so we only accept a definite answer.)
    """
    fs, path = filesystem(url)

    def probe() -> bool:
        _invalidate(fs, path)
        try:
            fs.info(path)
        except FileNotFoundError:
            return False
        return True

    return _with_retries("check", url, probe, retry)


def remove(url: str, *, retry: RetryPolicy | None = None) -> None:
    """Delete one file; a missing file is not an error (object-store deletes are idempotent)."""
    fs, path = filesystem(url)

    def delete() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        finally:
            _invalidate(fs, path)

    return _with_retries("delete", url, delete, retry)


def remove_tree(url: str, *, retry: RetryPolicy | None = None) -> None:
    """Delete ``url`` and everything below it; a missing tree is not an error."""
    fs, path = filesystem(url)

    def delete() -> None:
        _invalidate(fs, path)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        finally:
            _invalidate(fs, path)

    _with_retries("delete", url, delete, retry)


def _child_name(parent: str, name: str) -> str:
    return name[len(parent) :].lstrip("/") if name.startswith(parent) else posixpath.basename(name)


def list_dirs(url: str, *, retry: RetryPolicy | None = None) -> list[str]:
    """URLs of the immediate child directories of ``url``, sorted by name; [] if missing.

    On object stores a "directory" is a key prefix. Some servers (SeaweedFS) keep listing a
    prefix after its last object was deleted, so callers must check contents, not presence.
    """
    fs, path = filesystem(url)
    parent = path.rstrip("/")

    def listing() -> list[str]:
        _invalidate(fs, parent)
        try:
            entries = fs.ls(parent, detail=True)
        except FileNotFoundError:
            return []
        names = {
            _child_name(parent, str(entry["name"]).rstrip("/"))
            for entry in entries
            if entry.get("type") == "directory"
        }
        return sorted(join(url, name) for name in names if name and name not in {".", ".."})

    return _with_retries("list", url, listing, retry)


def list_files(url: str, *, retry: RetryPolicy | None = None) -> list[str]:
    """Paths of all files below ``url``, relative to it (``/``-separated), sorted; [] if missing.

    Used to find stale files in a checkpoint directory being rewritten.
    """
    fs, path = filesystem(url)
    parent = path.rstrip("/")

    def listing() -> list[str]:
        _invalidate(fs, parent)
        try:
            found = fs.find(parent, withdirs=False)
        except FileNotFoundError:
            return []
        prefix = parent + "/"
        return sorted(str(name)[len(prefix) :] for name in found if str(name).startswith(prefix))

    return _with_retries("list", url, listing, retry)


def read_stream(
    url: str, *, chunk_size: int = 1024**2, retry: RetryPolicy | None = None
) -> tuple[int | None, Generator[bytes, None, None]]:
    """(size, chunks) of the file at ``url``, for files too big to hold (dataset archives).

    The size (None where the storage does not say) comes first, so a caller with a cap
    refuses before reading. Opening and every chunk are retried per the policy; a retried
    chunk is read again from its offset, so no byte is lost or doubled. A missing file
    raises ``FileNotFoundError``, a directory ``IsADirectoryError``. Close the iterator
    (or read it to the end) to close the file.
    """
    fs, path = filesystem(url)

    def probe() -> int | None:
        _invalidate(fs, path)
        info = fs.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{redact(url)} is a directory")
        size = info.get("size")
        return int(size) if size is not None else None

    size = _with_retries("check", url, probe, retry)
    return size, _chunks(url, fs, path, chunk_size, retry)


def _chunks(
    url: str, fs: fsspec.AbstractFileSystem, path: str, chunk_size: int,
    retry: RetryPolicy | None,
) -> Generator[bytes, None, None]:
    """The chunks of :func:`read_stream`: the file is opened on the first one."""
    handle = _with_retries("open", url, lambda: fs.open(path, "rb"), retry)
    offset = 0

    def chunk() -> bytes:
        handle.seek(offset)
        return handle.read(chunk_size)

    try:
        while data := _with_retries("read", url, chunk, retry):
            offset += len(data)
            yield data
    finally:
        handle.close()
