"""The OpenAI-compatible backend against a real chat-completions server on loopback.

Every test talks HTTP to :class:`tests.support.chat_server.ChatServer` through the real
``openai`` client: retries, timeouts and error bodies are the protocol's, not mocks.
"""

from __future__ import annotations

import base64
import io
import logging
import pickle
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from engine.caption.api import MAX_IMAGE_SIDE, ApiCaptioner
from engine.caption.backend import CaptionError, CaptionOutcome, ImageToCaption
from engine.task.definition import CaptioningArgs
from tests.support.chat_server import (
    ChatServer,
    content_filtered,
    empty,
    error,
    malformed,
    ok,
    rate_limited,
    refusal,
    server_error,
    slow,
)

KEY_ENV = "LORAFLOW_TEST_CAPTION_KEY"
CANARY = "sk-canary-3f9a1c7e5b2d4086"


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer(api_key=CANARY) as chat:
        yield chat


def _args(base_url: str, **changes: Any) -> CaptioningArgs:
    return CaptioningArgs(**{
        "backend": "openai", "model": "vision-test", "base_url": base_url,
        "api_key_env": KEY_ENV, "timeout_seconds": 2.0, "max_retries": 2, **changes,
    })


def _captioner(base_url: str, environ: dict[str, str] | None = None,
               **changes: Any) -> ApiCaptioner:
    environ = {KEY_ENV: CANARY} if environ is None else environ
    return ApiCaptioner(_args(base_url, **changes), environ, first_backoff_seconds=0.01)


def _image(name: str = "dog_01.png", size: tuple[int, int] = (64, 48)) -> ImageToCaption:
    return ImageToCaption(name, "0" * 64, Image.new("RGB", size, (200, 30, 30)))


def _sent_image(url: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


# -- a normal answer -------------------------------------------------------------------


def test_caption_sends_the_instruction_and_the_image_and_returns_the_answer(
    server: ChatServer,
) -> None:
    server.script(ok("A red square."))
    captioner = _captioner(server.base_url, prompt="Caption {trigger}.", trigger="sks",
                           max_length=40)
    assert captioner.caption([_image()]) == [CaptionOutcome("A red square.")]
    (request,) = server.requests
    assert request.headers["authorization"] == f"Bearer {CANARY}"
    assert request.body["model"] == "vision-test"
    assert request.body["max_tokens"] == 40
    assert request.body["messages"][0]["content"][0] == {"type": "text", "text": "Caption sks."}
    (url,) = request.image_urls
    sent = _sent_image(url)
    assert sent.size == (64, 48)
    assert sent.getpixel((32, 24))[0] > 150  # the red image, not some other


def test_caption_shrinks_a_large_image_to_the_max_side_keeping_its_aspect(
    server: ChatServer,
) -> None:
    _captioner(server.base_url).caption([_image(size=(3000, 1500))])
    assert _sent_image(server.requests[0].image_urls[0]).size == (MAX_IMAGE_SIDE,
                                                                 MAX_IMAGE_SIDE // 2)


def test_caption_answers_each_image_in_order_with_one_request_each(server: ChatServer) -> None:
    server.script(ok("first"), ok("second"))
    outcomes = _captioner(server.base_url).caption([_image("a.png"), _image("b.png")])
    assert [o.caption for o in outcomes] == ["first", "second"]
    assert len(server.requests) == 2


# -- the key ----------------------------------------------------------------------------


def test_a_missing_key_for_a_remote_server_is_a_clear_error_naming_the_variable() -> None:
    with pytest.raises(CaptionError, match=f"no API key; set the environment variable "
                                           f"{KEY_ENV}"):
        _captioner("https://api.example.com/v1", environ={})


def test_a_loopback_server_is_called_without_a_key() -> None:
    with ChatServer(api_key=None) as local:
        local.script(ok("a cat"))
        assert _captioner(local.base_url, environ={}).caption([_image()])[0].caption == "a cat"


def test_a_base_url_with_credentials_is_refused() -> None:
    with pytest.raises(CaptionError, match="must not hold credentials") as caught:
        _captioner("https://user:hunter2secret@api.example.com/v1")
    assert "hunter2secret" not in str(caught.value)


def test_a_base_url_with_a_query_is_refused_without_quoting_it() -> None:
    # the client appends "chat/completions" after the query: ".../v1/?a=1chat/completions"
    with pytest.raises(CaptionError, match="no query or fragment") as caught:
        _captioner("https://gw.example.com/v1?api-version=1&token=secret123")
    assert "secret123" not in str(caught.value) and "gw.example.com/v1" in str(caught.value)


def test_a_wrong_key_is_not_retried_and_names_the_variable_not_the_key() -> None:
    with ChatServer(api_key="sk-the-right-one") as chat:
        with pytest.raises(CaptionError, match=rf"HTTP 401.*\${KEY_ENV}.*not retried") as caught:
            _captioner(chat.base_url).caption([_image()])
        assert len(chat.requests) == 1
    assert CANARY not in str(caught.value)


def test_the_key_appears_in_no_log_output_error_repr_or_fingerprint(
    server: ChatServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the client's and httpx's included
    captioner = _captioner(server.base_url, max_retries=1)
    server.script(server_error(), ok("fine"), error(400, f"bad request from key {CANARY}"))
    assert captioner.caption([_image("one.png")])[0].caption == "fine"
    with pytest.raises(CaptionError) as caught:
        captioner.caption([_image("two.png")])
    assert "bad request from key ***" in str(caught.value)
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(captioner)
    captured = capsys.readouterr()
    seen = [caplog.text, captured.out, captured.err, str(caught.value), repr(caught.value),
            repr(captioner), str(captioner.fingerprint)]
    assert "retry 1 of 1" in caplog.text  # the logs did record the retry
    assert all(CANARY not in text for text in seen)


# -- retries ---------------------------------------------------------------------------


def test_a_server_error_is_retried_until_it_answers(server: ChatServer) -> None:
    server.script(server_error(500), server_error(503), ok("a dog"))
    assert _captioner(server.base_url).caption([_image()]) == [CaptionOutcome("a dog")]
    assert len(server.requests) == 3


def test_a_server_down_after_its_retries_is_an_error_naming_backend_url_model_and_image(
    server: ChatServer,
) -> None:
    server.default = server_error(500)
    with pytest.raises(CaptionError) as caught:
        _captioner(server.base_url, max_retries=2).caption([_image("dog_07.jpg")])
    message = str(caught.value)
    assert len(server.requests) == 3
    for part in ("'openai'", server.base_url, "'vision-test'", "'dog_07.jpg'", "HTTP 500",
                 "after 3 attempts"):
        assert part in message


def test_a_refused_connection_is_retried_then_a_clear_error() -> None:
    closed = ChatServer().start()
    base_url = closed.base_url
    closed.stop()
    with pytest.raises(CaptionError, match="cannot connect to the server.*after 2 attempts"):
        _captioner(base_url, max_retries=1).caption([_image()])


def test_a_429_waits_as_long_as_its_retry_after_says(server: ChatServer) -> None:
    server.script(rate_limited(retry_after=1), ok("a dog"))
    assert _captioner(server.base_url).caption([_image()])[0].caption == "a dog"
    first, second = server.requests
    # the backoff is 0.01 s here: a one-second gap is the server's Retry-After
    assert second.received_at - first.received_at >= 0.95


def test_a_retry_after_longer_than_the_cap_waits_only_the_cap(server: ChatServer) -> None:
    server.script(rate_limited(retry_after=3600), ok("a dog"))
    captioner = ApiCaptioner(_args(server.base_url), {KEY_ENV: CANARY}, max_wait_seconds=0.05)
    started = time.monotonic()
    assert captioner.caption([_image()])[0].caption == "a dog"
    assert time.monotonic() - started < 5
    assert len(server.requests) == 2


def test_rate_limited_after_its_retries_is_a_clear_error(server: ChatServer) -> None:
    server.default = rate_limited(retry_after=0.05)
    with pytest.raises(CaptionError, match="HTTP 429: Rate limit reached.*after 2 attempts"):
        _captioner(server.base_url, max_retries=1).caption([_image()])
    assert len(server.requests) == 2


def test_a_slow_answer_past_the_timeout_is_retried_then_a_clear_error(
    server: ChatServer,
) -> None:
    server.default = slow(30)
    started = time.monotonic()
    with pytest.raises(CaptionError, match=r"no answer within 0\.2 s \(after 2 attempts\)"):
        _captioner(server.base_url, timeout_seconds=0.2, max_retries=1).caption([_image()])
    assert time.monotonic() - started < 5  # two timeouts, not the server's 30 s
    assert len(server.requests) == 2


def test_a_slow_answer_then_a_prompt_one_is_a_caption(server: ChatServer) -> None:
    server.script(slow(30), ok("a dog"))
    captioner = _captioner(server.base_url, timeout_seconds=0.2)
    assert captioner.caption([_image()])[0].caption == "a dog"


def test_malformed_json_is_retried_then_a_clear_error(server: ChatServer) -> None:
    server.default = malformed()
    with pytest.raises(CaptionError, match=r"malformed answer \(not JSON.*after 3 attempts"):
        _captioner(server.base_url).caption([_image("x.png")])
    assert len(server.requests) == 3


def test_malformed_json_then_a_good_answer_is_a_caption(server: ChatServer) -> None:
    server.script(malformed(), ok("a dog"))
    assert _captioner(server.base_url).caption([_image()])[0].caption == "a dog"


@pytest.mark.parametrize("status, message, hint", [
    (404, "The model 'vision-test' does not exist", "check captioning.model"),
    (400, "Invalid image", "not retried"),
    (403, "Forbidden", f"${KEY_ENV}"),
])
def test_a_client_error_is_not_retried_and_quotes_the_server(
    server: ChatServer, status: int, message: str, hint: str,
) -> None:
    server.default = error(status, message)
    with pytest.raises(CaptionError) as caught:
        _captioner(server.base_url).caption([_image("dog.png")])
    assert len(server.requests) == 1
    text = str(caught.value)
    assert f"HTTP {status}: {message}" in text and hint in text and "'dog.png'" in text


# -- answers without a caption ---------------------------------------------------------


@pytest.mark.parametrize("reply, reason", [
    (empty(), "empty answer"),
    (ok("   \n"), "empty answer"),
    (refusal("I can't help with that."), "refused: I can't help with that."),
    (content_filtered(), "refused: stopped by the server's content filter"),
    (ok("I'm sorry, but I can't describe this image."), "refused: I'm sorry, but I can't"),
])
def test_an_empty_or_refused_answer_is_an_outcome_without_caption_and_not_retried(
    server: ChatServer, reply: Any, reason: str,
) -> None:
    server.script(reply)
    (outcome,) = _captioner(server.base_url).caption([_image()])
    assert outcome.caption is None
    assert outcome.reason is not None and outcome.reason.startswith(reason)
    assert len(server.requests) == 1


# -- fingerprint -------------------------------------------------------------------------


def test_fingerprint_names_backend_url_model_filled_prompt_and_max_length() -> None:
    captioner = _captioner("https://gw.example.com/v1",
                           prompt="Photo of {trigger}", trigger="sks", max_length=60)
    assert captioner.fingerprint == {
        "backend": "openai", "base_url": "https://gw.example.com/v1", "model": "vision-test",
        "prompt": "Photo of sks", "max_length": "60",
    }


def test_fingerprint_differs_when_the_prompt_differs() -> None:
    one = _captioner("https://gw.example.com/v1", prompt="Describe it.")
    two = _captioner("https://gw.example.com/v1", prompt="Describe it briefly.")
    assert one.fingerprint != two.fingerprint


def test_a_transformers_task_is_not_this_backend() -> None:
    with pytest.raises(CaptionError, match="'openai' backend"):
        ApiCaptioner(CaptioningArgs(backend="transformers", model="m"), {})
