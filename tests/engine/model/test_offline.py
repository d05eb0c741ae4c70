"""A Hub model that cannot be had here is refused at once, and the message says why.

Before: ``runwayml/stable-diffusion-v1-5`` on a machine without network was retried for
half a minute per file (minutes when the network times out) and then blamed "does not
appear to have a file named model_index.json"; the real cause, no network or offline
mode, was only in log warnings. Now one look in the local cache and, when the model is
not there, one HEAD request without retries decide, and the error names the cause.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.errors import ExitCode
from engine.model.loading import ModelLoadError, inspect_model
from engine.task.definition import ModelArgs

ROOT = Path(__file__).resolve().parents[3]
HUB_MODEL = "runwayml/stable-diffusion-v1-5"
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _closed_loopback_port() -> int:
    """A loopback port where nothing listens: a connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_mode_and_an_uncached_hub_model_is_said_plainly_and_fast() -> None:
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # conftest switches the Hub libraries offline
    import diffusers  # noqa: F401 - its import time is not what is measured

    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        inspect_model(ModelArgs(name=HUB_MODEL))
    took = time.monotonic() - started
    message = str(info.value)
    print(f"{took:.2f} s: {message}")
    assert HUB_MODEL in message
    assert "not in the local Hugging Face cache" in message
    assert "offline" in message and "HF_HUB_OFFLINE" in message
    assert "does not appear to have" not in message
    assert info.value.exit_code == ExitCode.BAD_INPUT
    assert took < 1


def test_a_cached_model_passes_and_a_missing_part_still_names_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only model_index.json is cached: the check lets it through (offline work that runs
    today still runs), and the part that is missing is blamed on offline mode, not on the
    model."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--owner--sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    with pytest.raises(ModelLoadError) as info:
        inspect_model(ModelArgs(name="owner/sd"))
    message = str(info.value)
    assert "unet/" in message and "offline mode is on" in message


def test_a_missing_local_folder_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "sd15"
    with pytest.raises(ModelLoadError) as info:
        inspect_model(ModelArgs(name=str(missing)))
    message = str(info.value)
    assert str(missing) in message and "no such local folder" in message
    assert "huggingface.co" not in message and "connect" not in message


@pytest.mark.timeout(120)
def test_unreachable_hub_under_loraflow_segment_is_one_clean_error_within_seconds(
    tmp_path: Path, loraflow_home: Path, demo_data: object
) -> None:
    task = tmp_path / "task.json"
    task.write_text(json.dumps({
        "model": {"name": HUB_MODEL},
        "dataset": {"name": "loraflow/demo-shapes"},
        "validation": {},
        "train_args": {"resolution": 64, "batch_size": 2, "num_train_steps": 1},
    }))
    endpoint = f"http://127.0.0.1:{_closed_loopback_port()}"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS}
    env.update(HF_ENDPOINT=endpoint, LORAFLOW_HOME=str(loraflow_home))
    out = tmp_path / "out"

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "segment", str(task), "--output-dir", str(out),
         "--data-dir", str(tmp_path / "data"), "--no-validation"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    took = time.monotonic() - started
    print(f"{took:.1f} s\n{done.stderr[-3000:]}")
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if HUB_MODEL in line]
    assert errors, done.stderr[-3000:]
    text = done.stderr
    assert "not in the local Hugging Face cache" in text and "cannot be reached" in text
    assert endpoint in text and "Retrying" not in text
    assert not out.exists()
    assert took < 20  # process start-up (torch, diffusers) included; before: 25 s and more


# -- what the Hub answers ----------------------------------------------------------------

#: repo name -> (status, X-Error-Code) a fake Hub answers for it.
HUB_ANSWERS = {
    "ok": (200, None),
    "missing": (404, "RepoNotFound"),
    "gated": (403, "GatedRepo"),
    "noindex": (404, "EntryNotFound"),
    "norevision": (404, "RevisionNotFound"),
    "down": (503, None),
}
EXPECTED = {
    "ok": "None",
    "missing": "is not on the Hub",
    "gated": "is gated on the Hub",
    "noindex": "has no model_index.json on the Hub",
    "norevision": "has no revision 'main'",
    "down": "refused the request",
}
ASK = """
from engine.model.hub import dataset_unavailable, model_unavailable
for name in {names!r}:
    print(name, "|", model_unavailable("owner/" + name, "model_index.json", "main"))
print("dataset |", dataset_unavailable("owner/ok"), "|", dataset_unavailable("owner/missing"))
"""


class _FakeHub(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        name = next((n for n in HUB_ANSWERS if f"/owner/{n}/" in self.path + "/"), "missing")
        status, code = HUB_ANSWERS[name]
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("ETag", '"abc"')
        self.send_header("X-Repo-Commit", "0" * 40)
        body = b'{"id": "owner/ok"}' if status == 200 else b"{}"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_HEAD = do_GET = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fake_hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_what_the_hub_answers_is_told_apart(fake_hub: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS}
    env.update(HF_ENDPOINT=fake_hub, HF_TOKEN="")
    done = subprocess.run([sys.executable, "-c", ASK.format(names=list(HUB_ANSWERS))],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = dict(line.split(" | ", 1) for line in done.stdout.splitlines())
    print(answers)
    for name, phrase in EXPECTED.items():
        assert phrase in answers[name], (name, answers[name])
    assert answers["dataset"].startswith("None | ") and "is not on the Hub" in answers["dataset"]
