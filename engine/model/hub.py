"""Whether a Hub model's (or dataset's) files can be had here: said fast and plainly.

Why: asked for a model that is neither in the local cache nor reachable, diffusers has
the Hub client retry five times per file (about 25 s when the connection is refused,
minutes when it times out) and then reports that the model "does not appear to have a
file named model_index.json"; the cause (offline mode, no network) is only in log
warnings. Here one look in the local cache and, when the file is not there, one request
without retries (under the Hub client's own timeout, ``HF_HUB_ETAG_TIMEOUT``) tell the
cases apart, and the answer is a sentence a user can act on. A cached file is never
probed, so whatever works offline today still does.

How huggingface_hub (2.x) signals the cases, read from its source: ``HF_HUB_OFFLINE=1``
(or ``TRANSFORMERS_OFFLINE=1``, read at import into ``constants.HF_HUB_OFFLINE``) makes
every request raise ``OfflineModeIsEnabled``; a network failure is an ``httpx2``
``TransportError`` (``ConnectError``, ``TimeoutException``); a download that found
neither network nor cache raises ``LocalEntryNotFoundError`` with that cause chained,
which diffusers turns into the misleading "does not appear to have a file named ...".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from engine.store.redact import redact

_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_hub_id(name: str) -> bool:
    """True when ``name`` has the form of a Hub repository id (``owner/name`` or ``name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def offline_setting(extra: tuple[str, ...] = ()) -> str | None:
    """The setting that switches the Hub off (``"HF_HUB_OFFLINE=1"``), or None when it is on.

    The environment is read now, not only at import as the Hub client does, so a value
    set after start-up is honoured too; ``extra`` adds variables (``HF_DATASETS_OFFLINE``).
    """
    for variable in (*_OFFLINE_VARIABLES, *extra):
        value = os.environ.get(variable, "")
        if value.strip().upper() in _TRUE:
            return f"{variable}={value.strip()}"
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else None


def cache_folder() -> str:
    """The local Hugging Face cache the loaders read (``HF_HUB_CACHE``, under ``HF_HOME``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def endpoint() -> str:
    """The Hub address requests go to (``HF_ENDPOINT``), without any credentials."""
    from huggingface_hub import constants

    return redact(str(constants.ENDPOINT))


def is_cached(repo_id: str, filename: str, revision: str | None) -> bool:
    """True when ``filename`` of model ``repo_id`` at ``revision`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return isinstance(found, str)


def model_unavailable(repo_id: str, filename: str, revision: str | None) -> str | None:
    """None when model ``repo_id``'s ``filename`` is cached or the Hub has it; else why not.

    The reason completes a sentence that starts with the model's name.
    """
    if not is_hub_id(repo_id):
        return "names no such local folder (and is not a Hub model id)"
    if is_cached(repo_id, filename, revision):
        return None
    where = f"is not a local folder and not in the local Hugging Face cache ({cache_folder()})"
    offline = offline_setting()
    if offline:
        at = f" --revision {revision}" if revision and revision != "main" else ""
        return (f"{where}, and offline mode is on ({offline}): download it once where there "
                f"is network (`hf download {repo_id}{at}`), or unset {offline.split('=')[0]}")
    remedy = "download it where there is network"
    return _ask_hub(where, lambda: _head(repo_id, filename, revision), filename, revision,
                    remedy)


def dataset_unavailable(repo_id: str) -> str | None:
    """None when the Hub has dataset ``repo_id`` (one request); else why it cannot be had.

    Hub datasets are always downloaded afresh (into a scratch folder), so without network
    they cannot be had whatever the local cache holds.
    """
    if not is_hub_id(repo_id):
        return "names no such local path (and is not a Hub dataset id)"
    where = "is not a local path, and a Hub dataset is downloaded when prepared"
    offline = offline_setting(("HF_DATASETS_OFFLINE",))
    if offline:
        return f"{where}, but offline mode is on ({offline})"
    return _ask_hub(where, lambda: _dataset_info(repo_id), None, None, "name a local copy")


def explain(exc: BaseException) -> str:
    """`` (why)`` when ``exc`` was caused by a missing network or offline mode, else ``""``.

    For errors that come out of diffusers or transformers after the check above passed
    (a weight file that is not cached, the network lost mid-download).
    """
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OfflineModeIsEnabled) or (
            isinstance(seen, LocalEntryNotFoundError) and offline_setting()
        ):
            return " (not in the local Hugging Face cache, and offline mode is on)"
        if _is_transport_error(seen):
            return f" (the Hub at {endpoint()} cannot be reached: {_one_line(seen)})"
        seen = seen.__cause__ or seen.__context__
    return ""


# -- one request, no retries --------------------------------------------------------------


def _head(repo_id: str, filename: str, revision: str | None) -> None:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=constants.ENDPOINT)
    get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT, retry_on_errors=False)


def _dataset_info(repo_id: str) -> None:
    from huggingface_hub import HfApi, constants

    HfApi().dataset_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)


def _is_transport_error(exc: BaseException) -> bool:
    import httpx2  # the Hub client's HTTP library (a dependency of huggingface_hub 2.x)

    return isinstance(exc, httpx2.TransportError)


def _one_line(exc: BaseException) -> str:
    """The first line of an error, credentials removed (the Hub client's run to several)."""
    lines = redact(str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _ask_hub(where: str, ask: Callable[[], Any], filename: str | None,
             revision: str | None, remedy: str) -> str | None:
    """Run one request; None when it succeeds, else the reason, starting with ``where``."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        ask()
    except OfflineModeIsEnabled:
        return f"{where}, and offline mode is on (HF_HUB_OFFLINE=1)"
    except GatedRepoError:
        return f"is gated on the Hub: accept its conditions on its page, then {login}"
    except RepositoryNotFoundError:
        return f"is not on the Hub ({endpoint()}), or is private: check the name, or {login}"
    except RevisionNotFoundError:
        return f"has no revision {revision!r} on the Hub"
    except RemoteEntryNotFoundError:
        return f"has no {filename} on the Hub: it is not a diffusers-format model"
    except HfHubHTTPError as exc:
        return f"{where}, and the Hub ({endpoint()}) refused the request: {_one_line(exc)}"
    except Exception as exc:
        if not _is_transport_error(exc):
            raise
        return (f"{where}, and the Hub at {endpoint()} cannot be reached ({_one_line(exc)}): "
                f"check the network (or HF_ENDPOINT, a proxy), or {remedy}")
    return None
