"""One caption cache for every entry point: ``loraflow caption``, ``loraflow run`` (the
flow's caption step) and ``loraflow segment`` keep answers in ``captions/`` of the same
``--data-dir``, so an answer one of them paid for is never asked for by another.

The backend is the ``openai`` one against a loopback chat-completions server that counts
the requests it gets. Each second command changes ``caption_template`` (how answers are
written, not what is asked): the captioned dataset is then a new one and cannot be reused
as it is, so only the caption cache can spare the backend. ``loraflow run`` is the real
CLI in a child process, on the session's Prefect server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli.main import main
from tests.support.chat_server import ChatServer, ok
from tests.support.datasets import make_zip, png
from tests.support.flow import subprocess_env

pytest_plugins = ["tests.support.flow_fixtures"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY_ENV = "LORAFLOW_TEST_CAPTION_CACHE_KEY"
PHOTOS = 3
#: A caption template of the second command: a new captioned dataset, the same questions.
REWRITTEN = "a photo, {caption}"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatServer]:
    """The loopback server; its key is in the environment a child process inherits."""
    monkeypatch.setenv(KEY_ENV, "sk-caption-cache-test")
    with ChatServer(api_key="sk-caption-cache-test", default=ok("A red square")) as chat:
        yield chat


def photos() -> list[bytes]:
    return [png(32, 32, color=(80 * i, 40, 200 - 60 * i)) for i in range(PHOTOS)]


def task_file(tmp_path: Path, server: ChatServer, dataset: dict | None = None) -> str:
    """A one-step tiny-sd1 task on ``dataset`` (default: a folder of uncaptioned photos)."""
    if dataset is None:
        folder = tmp_path / "photos"
        folder.mkdir()
        for i, image in enumerate(photos()):
            (folder / f"p{i}.png").write_bytes(image)
        dataset = {"name": str(folder)}
    doc = {
        "model": {"name": "loraflow/tiny-sd1"},
        "dataset": dataset,
        "validation": {"num_images": 1, "num_inference_steps": 2},
        "train_args": {"resolution": 32, "batch_size": 1, "gradient_accumulation_steps": 1,
                       "max_train_steps": 1, "num_train_steps": 1},
        "captioning": {"backend": "openai", "model": "test-model", "base_url": server.base_url,
                       "api_key_env": KEY_ENV},
    }
    path = tmp_path / "task.json"
    path.write_text(json.dumps(doc))
    return str(path)


def caption(task: str, data_dir: Path, *overrides: str,
            capsys: pytest.CaptureFixture[str]) -> dict:
    """``loraflow caption`` in this process; its JSON summary."""
    code = main(["caption", task, *overrides, "--data-dir", str(data_dir), "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def loraflow_run(task: str, data_dir: Path, out: Path, prefect_api: str, *overrides: str
                 ) -> dict:
    """``loraflow run`` in a child process; the captions of its run summary."""
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", task, *overrides, "--output-dir", str(out),
         "--data-dir", str(data_dir), "--cache-dir", str(out.parent / "cache"), "-q"],
        env=subprocess_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (summary_file,) = out.rglob("run_summary.json")
    return json.loads(summary_file.read_text())["dataset"]["captions"]


def first_captions(captions: dict) -> list[str]:
    (subset,) = captions["subsets"].values()
    return [pair["caption"] for pair in subset["pairs"]]


def test_loraflow_run_after_loraflow_caption_asks_the_backend_nothing(
    server: ChatServer, prefect_api: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task, data = task_file(tmp_path, server), tmp_path / "data"
    assert caption(task, data, capsys=capsys)["captioned"] == PHOTOS
    assert len(server.requests) == PHOTOS
    captions = loraflow_run(task, data, tmp_path / "run", prefect_api,
                            f"captioning.caption_template={REWRITTEN}")
    assert len(server.requests) == PHOTOS  # not one more
    assert (captions["captioned"], captions["from_cache"]) == (0, PHOTOS)
    assert first_captions(captions) == ["a photo, A red square"] * PHOTOS


def test_loraflow_caption_after_loraflow_run_asks_the_backend_nothing(
    server: ChatServer, prefect_api: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task, data = task_file(tmp_path, server), tmp_path / "data"
    assert loraflow_run(task, data, tmp_path / "run", prefect_api)["captioned"] == PHOTOS
    assert len(server.requests) == PHOTOS
    summary = caption(task, data, f"captioning.caption_template={REWRITTEN}", capsys=capsys)
    assert len(server.requests) == PHOTOS
    assert (summary["captioned"], summary["from_cache"]) == (0, PHOTOS)
    assert first_captions(summary) == ["a photo, A red square"] * PHOTOS


def test_loraflow_segment_after_loraflow_caption_asks_the_backend_nothing(
    server: ChatServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = make_zip(tmp_path / "photos.zip",
                       {f"photos/p{i}.png": image for i, image in enumerate(photos())})
    task = task_file(tmp_path, server, dataset={"url": archive.as_uri()})
    data = tmp_path / "data"
    assert caption(task, data, capsys=capsys)["captioned"] == PHOTOS
    code = main(["segment", task, f"captioning.caption_template={REWRITTEN}",
                 "--output-dir", str(tmp_path / "segment"), "--data-dir", str(data),
                 "--no-validation", "-q"])
    assert code == 0 and json.loads(capsys.readouterr().out)["finished"] is True
    assert len(server.requests) == PHOTOS


def test_the_caption_cache_is_in_the_data_folder_it_was_given(
    server: ChatServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = task_file(tmp_path, server)
    caption(task, tmp_path / "data", capsys=capsys)
    answers = list((tmp_path / "data/captions").rglob("*.json"))
    assert len(answers) == PHOTOS + 1  # one per image, and the fingerprint
    elsewhere = caption(task, tmp_path / "other-data", capsys=capsys)
    assert elsewhere["captioned"] == PHOTOS  # another data folder: another cache
    assert len(server.requests) == 2 * PHOTOS
