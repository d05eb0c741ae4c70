"""What counts as a secret in a URL or a message, and how it is hidden: one policy.

Secrets that reach us by accident, and where each is hidden:

* ``user:password@`` userinfo in a URL (every function here);
* query (or fragment) parameters whose *name* looks secret, such as presigned S3 URLs'
  ``X-Amz-Signature`` / ``X-Amz-Credential``, Azure's ``sig``, ``token``, ``api_key``,
  ``password``, ``session``, ``policy`` (:data:`SECRET_NAME`, matched anywhere in the name);
* bare ``name=value`` pairs in a message whose name ends in such a word (``--password=x``);
* the literal values of the AWS credential environment variables, should a library ever
  echo them back (values shorter than 8 characters are left alone: they would mangle
  ordinary words in tests).

Three uses need three shapes of the same policy:

* :func:`redact` for free text (log lines, error messages, run summaries): secrets become
  ``***``, everything else stays as written, so a message still says what failed.
* :func:`redact_url` for one URL kept in a record (a prepared dataset's manifest and the
  hash that names its folder): userinfo and fragment dropped, secret parameter values
  become ``REDACTED``, harmless parameters (``part=2``) kept. The exact text is hashed into
  dataset addresses, so it must not change between versions (hence ``REDACTED``, not
  ``***``: it is what those addresses were computed with).
* :func:`public_url` for a URL written into a published file (LoRA header, task.json): only
  scheme, host, port and path, since a shared file outlives any signature and any query
  may carry one. A URL without a host (``file:///x``) is kept as written unless a
  parameter in it looks secret.

A local path (no scheme, or a one-letter Windows drive) is never changed by the URL
functions.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

__all__ = ["SECRET_NAME", "has_userinfo", "public_url", "redact", "redact_url"]

#: A parameter name that looks like it carries a secret (searched, case-insensitive).
SECRET_NAME = re.compile(
    r"sig|signature|token|credential|secret|password|passwd|auth|key|session|policy",
    re.IGNORECASE,
)
_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_MIN_ENV_SECRET = 8

_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]+@")
_URL_TOKEN_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")
_URL_PARAM_RE = re.compile(r"(?P<head>[?&;#](?P<name>[^=&;#\s]*)=)(?P<value>[^&;#\s'\"]*)")
# Outside URLs only names that end in a secret word: "design=" or "monkey=" are not secrets.
_BARE_PARAM_RE = re.compile(
    r"(?i)(?P<name>(?<![\w.\-])(?:[\w.\-]*[_.\-])?"
    r"(?:key|key_id|secret|token|password|passwd|credentials?|signature|sig|auth|session|policy)"
    r"=)[^&\s'\"]+"
)


def has_userinfo(url: str) -> bool:
    """Whether ``url`` embeds ``user[:password]@`` (which storage refuses outright)."""
    return "://" in url and _USERINFO_RE.search(url) is not None


def redact(text: str) -> str:
    """``text`` (a URL or a message) with every secret replaced by ``***``.

    URLs inside the text lose userinfo (``https://***@host``) and the values of secret
    query parameters; anywhere in the text, ``password=...`` style values go; then the
    AWS credential values are removed wherever they appear.
    """
    text = _URL_TOKEN_RE.sub(lambda match: _redact_url_token(match.group(0)), str(text))
    text = _BARE_PARAM_RE.sub(r"\g<name>***", text)
    return _scrub_environment(text)


def redact_values(value: Any) -> Any:
    """``value`` (JSON-like: mappings, lists, strings) with every string redacted: for
    summaries and records that hold URLs and messages, before they are published."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


def redact_url(url: str) -> str:
    """``url`` for a record: no userinfo, no fragment, secret parameter values ``REDACTED``.

    Harmless parameters are kept (re-encoded), so two sources that differ only in, say,
    ``part=2`` keep different records.
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a drive letter)
        return url
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    safe_query = [(k, "REDACTED" if SECRET_NAME.search(k) else v) for k, v in query]
    bare = urllib.parse.urlunsplit(
        (parts.scheme, _host_and_port(parts), parts.path, urllib.parse.urlencode(safe_query), "")
    )
    return _finish(bare)


def public_url(url: str) -> str:
    """``url`` for a published file: scheme, host, port and path only.

    Userinfo, query and fragment are dropped (that is where signed tokens live). A URL with
    no host is kept as written, unless a parameter in it looks secret (then as
    :func:`redact_url` shows it).
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or not parts.netloc:
        if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a drive letter)
            return url
        return redact_url(url) if _has_secret_parameter(parts) else _finish(url)
    bare = urllib.parse.urlunsplit((parts.scheme, _host_and_port(parts), parts.path, "", ""))
    return _finish(bare)


# -- helpers ---------------------------------------------------------------------------


def _host_and_port(parts: urllib.parse.SplitResult) -> str:
    """The netloc without userinfo (the host as urllib normalises it: lower case).

    A netloc urllib cannot parse (``zip://a::s3://...`` has no integer port) is kept as
    written after the last ``@``: a redactor must not fail on the error path it guards.
    """
    try:
        port = parts.port
    except ValueError:
        return parts.netloc.rpartition("@")[2]
    host = parts.hostname or ""
    return f"{host}:{port}" if port is not None else host


def _has_secret_parameter(parts: urllib.parse.SplitResult) -> bool:
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    pairs += urllib.parse.parse_qsl(parts.fragment, keep_blank_values=True)
    return any(SECRET_NAME.search(name) for name, _ in pairs)


def _redact_url_token(token: str) -> str:
    """One URL inside a message: userinfo -> ``***@``, secret parameter values -> ``***``."""
    token = _USERINFO_RE.sub(r"\g<scheme>***@", token)
    cut = min((i for i in (token.find("?"), token.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return token

    def hide(match: re.Match[str]) -> str:
        if SECRET_NAME.search(match.group("name")):
            return match.group("head") + "***"
        return match.group(0)

    return token[:cut] + _URL_PARAM_RE.sub(hide, token[cut:])


def _finish(url: str) -> str:
    """Last pass of the URL functions: userinfo of a chained URL (``zip://a::s3://u:p@b``)
    is not in the outer netloc, so it is removed by pattern; then the environment values."""
    return _scrub_environment(_USERINFO_RE.sub(r"\g<scheme>", url))


def _scrub_environment(text: str) -> str:
    for var in _SECRET_ENV_VARS:
        value = os.environ.get(var, "")
        if len(value) >= _MIN_ENV_SECRET:
            text = text.replace(value, "***")
    return text
