"""Captions from an OpenAI-compatible chat-completions API (backend ``openai``).

One request per image through the official ``openai`` client (extra ``caption-api``): the
instruction and the image, as a JPEG data URL no larger than :data:`MAX_IMAGE_SIDE`, in
one user message. Works with OpenAI itself and with vLLM, Ollama, LM Studio or a gateway
in front of a hosted model, given their base URL.

The key comes only from the environment variable named by ``api_key_env``. Without it,
only a loopback server (localhost, 127.0.0.0/8, ::1: a local Ollama or vLLM) is called, with
a placeholder the client needs; anything else is refused, since a remote server without a
key can only answer 401. The key is never in a message, log line, repr or fingerprint: it
is redacted from any server text we quote, errors are raised without the client's
exception chained (its request holds the header), and the object refuses to be pickled.

Retries are ours, not the client's (it gets ``max_retries=0``): the client retries 5xx,
429 and timeouts itself, but not a malformed body (a bare JSONDecodeError), and it waits as
long as a Retry-After says up to two minutes a time. Here one policy covers all of them:
connection errors, timeouts, 408/409/429/5xx and malformed answers are retried up to
``max_retries`` times, with exponential backoff or the server's Retry-After, each wait at
most :data:`MAX_RETRY_WAIT_SECONDS`; any other 4xx (bad key, unknown model) stops at once.
"""

from __future__ import annotations

import base64
import email.utils
import io
import ipaddress
import json
import logging
import math
import os
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from engine.caption.backend import CaptionError, CaptionOutcome, ImageToCaption
from engine.caption.text import instruction, refusal_reason
from engine.store.redact import has_userinfo, public_url, redact
from engine.task.definition import CaptioningArgs

__all__ = ["DEFAULT_BASE_URL", "MAX_IMAGE_SIDE", "MAX_RETRY_WAIT_SECONDS", "ApiCaptioner"]

log = logging.getLogger(__name__)

#: Where requests go when the task gives no base_url (the client's own default).
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Longest image side sent: vision models tile or shrink larger images anyway, and a
#: 1024-pixel JPEG keeps a request well under gateways' body limits.
MAX_IMAGE_SIDE = 1024
#: Longest single wait between attempts, whatever a Retry-After asks.
MAX_RETRY_WAIT_SECONDS = 60.0
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 8.0
_RETRIED_STATUS = frozenset({408, 409, 429})
_NO_KEY_PLACEHOLDER = "no-key"  # sent to loopback servers that need none
_MAX_QUOTED = 300  # characters of a server's error message quoted in ours


class _Retryable(Exception):
    """One failed attempt worth another: a description, and the wait the server asked."""

    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


class ApiCaptioner:
    """:class:`~engine.caption.backend.Captioner` for an OpenAI-compatible API.

    ``environ`` is where the key is read (``os.environ`` unless a test passes its own).
    ``first_backoff_seconds`` and ``max_wait_seconds`` shape the waits between attempts.
    """

    def __init__(
        self,
        args: CaptioningArgs,
        environ: Mapping[str, str] = os.environ,
        *,
        first_backoff_seconds: float = _FIRST_BACKOFF_SECONDS,
        max_wait_seconds: float = MAX_RETRY_WAIT_SECONDS,
    ) -> None:
        if args.backend != "openai":
            raise CaptionError(f"ApiCaptioner is the 'openai' backend, not {args.backend!r}")
        base_url = args.base_url or DEFAULT_BASE_URL
        if has_userinfo(base_url):
            raise CaptionError(
                "captioning.base_url must not hold credentials (user:password@): the task "
                f"is stored with the run; put the key in ${args.api_key_env} instead"
            )
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CaptionError(f"captioning.base_url {public_url(base_url)!r} is not an "
                               "http(s) URL with a host")
        if parts.query or parts.fragment:
            # the client appends its paths to the URL as a string: a query would end up
            # in the middle of it (and a query is where URL-borne tokens live)
            raise CaptionError(f"captioning.base_url {public_url(base_url)!r}: no query or "
                               "fragment, please (the client adds the path after it)")
        self._args = args
        self._shown_url = public_url(base_url)
        self._instruction = instruction(args)
        self._first_backoff = first_backoff_seconds
        self._max_wait = max_wait_seconds
        self._key = environ.get(args.api_key_env) or None
        if self._key is None and not _is_loopback(parts.hostname):
            raise CaptionError(
                f"captioning backend 'openai' at {self._shown_url}: no API key; set the "
                f"environment variable {args.api_key_env} (captioning.api_key_env names it)"
            )
        openai = _import_openai()
        self._client = openai.OpenAI(
            api_key=self._key or _NO_KEY_PLACEHOLDER,
            base_url=base_url,
            timeout=args.timeout_seconds,
            max_retries=0,
        )

    @property
    def fingerprint(self) -> dict[str, str]:
        return {
            "backend": "openai",
            "base_url": self._shown_url,
            "model": self._args.model,
            "prompt": self._instruction,
            "max_length": str(self._args.max_length),
        }

    def caption(self, images: Sequence[ImageToCaption]) -> list[CaptionOutcome]:
        return [self._caption_one(item) for item in images]

    def __repr__(self) -> str:
        return f"ApiCaptioner(base_url={self._shown_url!r}, model={self._args.model!r})"

    def __reduce__(self) -> Any:
        raise TypeError("an ApiCaptioner holds an API key and is not pickled; build it "
                        "again from the task where it is needed")

    # -- one image ---------------------------------------------------------------------

    def _caption_one(self, item: ImageToCaption) -> CaptionOutcome:
        messages = [{"role": "user", "content": [
            {"type": "text", "text": self._instruction},
            {"type": "image_url", "image_url": {"url": image_data_url(item.image)}},
        ]}]
        retries = self._args.max_retries
        attempt = 1
        while True:
            try:
                return self._request(messages, item)
            except _Retryable as failure:
                if attempt > retries:
                    raise CaptionError(
                        f"{self._where(item)}: {failure} (after {attempt} attempt"
                        f"{'s' if attempt > 1 else ''})"
                    ) from None
                wait = self._wait(attempt, failure.retry_after)
                log.warning("%s: %s; retry %d of %d in %.1f s", self._where(item), failure,
                            attempt, retries, wait)
                time.sleep(wait)
            attempt += 1

    def _request(self, messages: list[dict[str, Any]], item: ImageToCaption) -> CaptionOutcome:
        """One attempt: an outcome, or :class:`_Retryable`, or a final CaptionError."""
        openai = _import_openai()
        try:
            completion = self._client.chat.completions.create(
                model=self._args.model, messages=messages, max_tokens=self._args.max_length
            )
        except openai.APITimeoutError:
            raise _Retryable(f"no answer within {self._args.timeout_seconds:g} s") from None
        except openai.APIConnectionError:
            raise _Retryable("cannot connect to the server") from None
        except openai.APIStatusError as err:
            problem = f"HTTP {err.status_code}: {self._quote(_server_message(err))}"
            if err.status_code in _RETRIED_STATUS or err.status_code >= 500:
                raise _Retryable(problem, _retry_after(err.response.headers)) from None
            raise CaptionError(f"{self._where(item)}: {problem}{self._hint(err.status_code)}"
                               " (not retried)") from None
        except json.JSONDecodeError as err:  # the client parses the body with json.loads
            raise _Retryable(f"malformed answer (not JSON: {err})") from None
        return _outcome(completion)

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._max_wait)
        backoff = min(self._first_backoff * 2 ** (attempt - 1), _MAX_BACKOFF_SECONDS)
        return min(backoff, self._max_wait)

    def _where(self, item: ImageToCaption) -> str:
        return (f"captioning backend 'openai' at {self._shown_url}, model "
                f"{self._args.model!r}, image {item.name!r}")

    def _hint(self, status: int) -> str:
        if status in (401, 403):
            return f"; check the key in ${self._args.api_key_env}"
        if status == 404:
            return "; check captioning.model and captioning.base_url"
        return ""

    def _quote(self, text: str) -> str:
        """Server text fit for our messages: short, and without the key should a server
        echo it back."""
        text = " ".join(str(text).split())[:_MAX_QUOTED]
        if self._key:
            text = text.replace(self._key, "***")
        return redact(text)


def image_data_url(image: Image.Image) -> str:
    """``image`` as a ``data:image/jpeg;base64,...`` URL, its longest side at most
    :data:`MAX_IMAGE_SIDE` (aspect kept)."""
    picture = image.convert("RGB") if image.mode != "RGB" else image
    if max(picture.size) > MAX_IMAGE_SIDE:
        picture = picture.copy()
        picture.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _outcome(completion: Any) -> CaptionOutcome:
    """The outcome of a parsed answer; a shape that is not a chat completion is retried."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Retryable("malformed answer (no choices)")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if message is None or not (content is None or isinstance(content, str)):
        raise _Retryable("malformed answer (no message text)")
    refused = getattr(message, "refusal", None)
    if isinstance(refused, str) and refused.strip():
        return CaptionOutcome(None, f"refused: {' '.join(refused.split())[:200]}")
    if getattr(choices[0], "finish_reason", None) == "content_filter":
        return CaptionOutcome(None, "refused: stopped by the server's content filter")
    if content is None or not content.strip():
        return CaptionOutcome(None, "empty answer")
    reason = refusal_reason(content)
    if reason is not None:
        return CaptionOutcome(None, reason)
    return CaptionOutcome(content)


def _server_message(err: Any) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else the client's text."""
    body = getattr(err, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return inner["message"]
    return getattr(err, "message", "") or "no message"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a 429/503 asks to wait: ``retry-after-ms``, ``Retry-After`` in seconds or
    as an HTTP date; None when absent or unreadable."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            when = email.utils.parsedate_tz(value) if name == "retry-after" else None
            if when is None:
                continue
            seconds = email.utils.mktime_tz(when) - time.time()
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


def _is_loopback(host: str) -> bool:
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise CaptionError("captioning backend 'openai' needs the openai package: "
                           "pip install 'loraflow[caption-api]'") from None
    return openai
