"""One redactor: the union of the three policies loraflow had (storage messages, archive
records, published LoRA headers), each case below taken from one of them."""

from __future__ import annotations

import pytest

from engine.lora import metadata
from engine.store import redact as redaction
from engine.store import storage
from engine.store.redact import public_url, redact, redact_url
from tests.support.engine import make_task

PRESIGNED = "https://user:pw@host:8443/d/x.zip?X-Amz-Signature=abc&X-Amz-Credential=k&part=2"


def test_storage_exposes_the_same_redactor() -> None:
    assert storage.redact is redact


# -- redact(text): messages -------------------------------------------------------------


def test_messages_lose_userinfo_secret_parameters_and_environment_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    text = redact("GET https://u:p@host/x?secret=abc&key=def failed: env-secret-value")
    assert text == "GET https://***@host/x?secret=***&key=*** failed: ***"


def test_messages_lose_what_the_archive_policy_hid() -> None:
    """Presigned-URL parameters (matched anywhere in the name), fragments with tokens."""
    text = redact(f"download of {PRESIGNED}#access_token=zz failed")
    assert text == (
        "download of https://***@host:8443/d/x.zip?X-Amz-Signature=***&X-Amz-Credential=***"
        "&part=2#access_token=*** failed"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("run --password=hunter2 now", "run --password=*** now"),
        ("api_key=5 aws_access_key_id=AKIA1 session_token=t", "api_key=*** aws_access_key_id=***"
         " session_token=***"),
        ("design=1 monkey=2 part=3", "design=1 monkey=2 part=3"),  # words, not secrets
        ("s3://bucket/path/file.bin: timed out", "s3://bucket/path/file.bin: timed out"),
    ],
)
def test_bare_secret_pairs_in_messages(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_short_environment_values_are_not_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "admin")  # would mangle "administrator"
    assert redact("administrator") == "administrator"


# -- redact_url(url): records (the archive's policy, exactly) ---------------------------


def test_record_url_keeps_harmless_parameters() -> None:
    assert redact_url(PRESIGNED) == (
        "https://host:8443/d/x.zip?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&part=2"
    )
    assert redact_url("/local/path.zip") == "/local/path.zip"
    assert redact_url("C:\\data\\x.zip") == "C:\\data\\x.zip"
    assert redact_url("gs://b/p.zip#frag") == "gs://b/p.zip"


def test_record_url_hides_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-0123456789")
    assert redact_url("s3://b/tok-0123456789/x") == "s3://b/***/x"


# -- public_url(url): published files (the LoRA header's policy) ------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (PRESIGNED, "https://host:8443/d/x.zip"),
        ("s3://Bucket/a/b?versionId=3", "s3://bucket/a/b"),
        ("memory://m/x?a=b%20c#f", "memory://m/x"),
        ("file:///abs/x", "file:///abs/x"),
        ("/abs/p?q", "/abs/p?q"),
        ("rel/p", "rel/p"),
        ("file:///abs/x?token=1", "file:///abs/x?token=REDACTED"),  # leaked before
        ("zip://a::s3://u:p@b/c.zip", "zip://a::s3://b/c.zip"),  # raised before
    ],
)
def test_public_url_keeps_only_scheme_host_and_path(url: str, expected: str) -> None:
    assert public_url(url) == expected


def test_published_task_json_shows_public_urls() -> None:
    task = make_task(**{"dataset.name": None, "dataset.url": PRESIGNED,
                        "checkpoint": "s3://b/run/checkpoint?sig=1"})
    data = metadata.public_task_dict(task)
    assert data["dataset"]["url"] == "https://host:8443/d/x.zip"
    assert data["checkpoint"] == "s3://b/run/checkpoint"
    assert "pw" not in metadata.task_json(task) and "abc" not in metadata.task_json(task)


def test_userinfo_detection_for_refusal() -> None:
    assert redaction.has_userinfo("s3://AKIA:secret@bucket/x")
    assert not redaction.has_userinfo("s3://bucket/x@y")
    assert not redaction.has_userinfo("/local/user@host")


def test_redact_values_reaches_every_string_of_a_summary() -> None:
    from engine.store.redact import redact_values

    summary = {"out": "s3://u:p@host/b", "runs": [{"cache": "https://x/y?X-Amz-Signature=abc"}],
               "steps": 3}
    cleaned = redact_values(summary)
    text = repr(cleaned)
    assert cleaned["steps"] == 3 and "u:p@" not in text and "abc" not in text
