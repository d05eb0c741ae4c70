"""A chat-completions server on loopback for tests: the real protocol, scripted per request.

The ``openai`` client talks to it over real HTTP (``POST /v1/chat/completions``), so the
tests exercise the client's own transport, timeouts and error types, not a mock of our
code. Each request takes the next scripted :class:`Reply` (or the default one when the
script is used up) and is recorded, so a test can count attempts and look at what was sent.

    with ChatServer(api_key="sk-test") as server:
        server.script(rate_limited(retry_after=1), ok("a red bicycle"))
        ...  # base_url=server.base_url
        assert len(server.requests) == 2

A slow reply waits on an event the server sets when it stops (or after its delay), never
on a bare sleep, so a test that times out ends as soon as the server is closed.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "ChatServer",
    "RecordedRequest",
    "Reply",
    "content_filtered",
    "empty",
    "error",
    "malformed",
    "ok",
    "rate_limited",
    "refusal",
    "server_error",
    "slow",
]

COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Reply:
    """What the server answers to one request."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0  # wait (on the server's stop event) before answering


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived: path, headers (lower-case names), the JSON body (None
    if it was not JSON) and when it arrived (``time.monotonic()``)."""

    path: str
    headers: dict[str, str]
    body: Any
    received_at: float

    @property
    def image_urls(self) -> list[str]:
        """The ``image_url`` parts of the messages (data URLs, for our client)."""
        urls = []
        for message in self.body.get("messages", []):
            content = message.get("content")
            if isinstance(content, list):
                urls += [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
        return urls


def _completion(message: dict[str, Any], finish_reason: str = "stop") -> bytes:
    return json.dumps({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


def _error_body(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": None}}).encode()


def ok(text: str) -> Reply:
    """A normal answer whose message content is ``text``."""
    return Reply(200, _completion({"role": "assistant", "content": text, "refusal": None}))


def empty() -> Reply:
    """A normal answer with empty content."""
    return ok("")


def refusal(text: str = "I can't help with that.") -> Reply:
    """An answer with the ``refusal`` field set and no content (OpenAI's refusal shape)."""
    return Reply(200, _completion({"role": "assistant", "content": None, "refusal": text}))


def content_filtered() -> Reply:
    """An answer stopped by the server's content filter: no content."""
    return Reply(200, _completion({"role": "assistant", "content": None}, "content_filter"))


def rate_limited(retry_after: float = 1) -> Reply:
    """429 with a ``Retry-After`` header (seconds)."""
    return Reply(429, _error_body("Rate limit reached", "rate_limit_error"),
                 {"Retry-After": f"{retry_after:g}"})


def server_error(status: int = 500) -> Reply:
    """A 5xx with an OpenAI-shaped error body."""
    return Reply(status, _error_body("The server had an error", "server_error"))


def error(status: int, message: str) -> Reply:
    """Any status (404 model not found, 400...) with an OpenAI-shaped error body."""
    return Reply(status, _error_body(message, "invalid_request_error"))


def malformed() -> Reply:
    """200 with a body that is not JSON, though it says it is."""
    return Reply(200, b'{"choices": [{"message": ')


def slow(delay_seconds: float, text: str = "too late") -> Reply:
    """A normal answer sent only after ``delay_seconds`` (or when the server stops)."""
    return Reply(**{**ok(text).__dict__, "delay_seconds": delay_seconds})


class ChatServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) speaking chat completions.

    ``api_key``: the bearer token every request must carry (401 otherwise, as OpenAI
    answers); None accepts requests with or without one (a local server such as Ollama).
    """

    def __init__(self, api_key: str | None = None, default: Reply | None = None) -> None:
        self.api_key = api_key
        self.default = default if default is not None else ok("a photo")
        self.requests: list[RecordedRequest] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        # a short poll interval: stop() returns as soon as serve_forever notices
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)

    @property
    def base_url(self) -> str:
        """The URL a client is given (``.../v1``, as OpenAI-compatible servers serve)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue ``replies``: the next requests get them in order."""
        with self._lock:
            self._script.extend(replies)

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release slow replies, stop serving and close the socket."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the request side ----------------------------------------------------------

    def _next_reply(self, request: RecordedRequest) -> Reply:
        """Record ``request``; answer 404 to another path and 401 to a wrong key (the
        script is kept for the next request), else the next scripted reply."""
        with self._lock:
            self.requests.append(request)
            if request.path != COMPLETIONS_PATH:
                return Reply(404, _error_body(f"no route {request.path}", "not_found"))
            if self.api_key is not None and request.headers.get("authorization") != (
                f"Bearer {self.api_key}"
            ):
                return Reply(401, _error_body("Incorrect API key provided",
                                              "invalid_request_error"))
            return self._script.popleft() if self._script else self.default

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet: tests read server.requests instead

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                received_at = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = server._next_reply(RecordedRequest(self.path, headers, body, received_at))
                if reply.delay_seconds:
                    server._stopping.wait(reply.delay_seconds)
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply.body)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

        return Handler
