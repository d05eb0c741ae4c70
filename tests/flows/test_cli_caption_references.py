"""The reference checks of ``loraflow segment`` and ``validate --check-refs`` on a task that
captions its images (``captioning``): they agree with how its data is prepared.

Such a task's source needs no caption column (preparation adds an empty one for the caption
step to fill), and its prepared copy lies at the address preparation gives it (uncaptioned
images kept), so ``loraflow segment`` after ``loraflow caption`` on a plain folder of photos
trains, even once the folder is gone. A task without ``captioning`` is still told its caption
column is missing. The backend is the ``openai`` one against a loopback chat-completions
server that counts the requests it gets.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli.main import main
from tests.support.chat_server import ChatServer, ok
from tests.support.datasets import png

pytestmark = pytest.mark.timeout(300)

KEY_ENV = "LORAFLOW_TEST_CAPTION_REFS_KEY"
PHOTOS = 2


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatServer]:
    monkeypatch.setenv(KEY_ENV, "sk-caption-refs-test")
    with ChatServer(api_key="sk-caption-refs-test", default=ok("A red square")) as chat:
        yield chat


def task_file(tmp_path: Path, server: ChatServer, *, captioning: bool = True) -> Path:
    """A one-step tiny-sd1 task on a local folder of photos with no caption at all."""
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(PHOTOS):
        (photos / f"p{i}.png").write_bytes(png(32, 32, color=(90 * i, 40, 200 - 80 * i)))
    doc = {
        "model": {"name": "loraflow/tiny-sd1"},
        "dataset": {"name": str(photos)},
        "validation": {"num_images": 1, "num_inference_steps": 2},
        "train_args": {"resolution": 32, "batch_size": 1, "gradient_accumulation_steps": 1,
                       "max_train_steps": 1, "num_train_steps": 1},
    }
    if captioning:
        doc["captioning"] = {"backend": "openai", "model": "test-model",
                             "base_url": server.base_url, "api_key_env": KEY_ENV}
    path = tmp_path / ("task.json" if captioning else "plain.json")
    path.write_text(json.dumps(doc))
    return path


def caption_then_segment(task: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         *, remove_source: bool = False) -> tuple[int, str]:
    """``loraflow caption``, then ``loraflow segment`` with the same data folder."""
    data = str(tmp_path / "data")
    assert main(["caption", str(task), "--data-dir", data, "-q"]) == 0
    capsys.readouterr()
    if remove_source:
        shutil.rmtree(tmp_path / "photos")
    code = main(["segment", str(task), "--output-dir", str(tmp_path / "segment"),
                 "--data-dir", data, "--no-validation", "-q"])
    out = capsys.readouterr()
    return code, out.out if code == 0 else out.err


def test_segment_after_caption_trains_on_a_plain_folder_of_uncaptioned_photos(
    server: ChatServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = caption_then_segment(task_file(tmp_path, server), tmp_path, capsys)
    assert code == 0, output
    assert json.loads(output)["finished"] is True
    assert len(server.requests) == PHOTOS  # segment found the captions: asked nothing


def test_segment_after_caption_trains_once_the_source_folder_is_gone(
    server: ChatServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = caption_then_segment(task_file(tmp_path, server), tmp_path, capsys,
                                        remove_source=True)
    assert code == 0, output  # the prepared copy, at preparation's address, stands in
    assert json.loads(output)["finished"] is True
    assert len(server.requests) == PHOTOS


def test_validate_check_refs_needs_no_caption_column_only_when_the_task_captions(
    server: ChatServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(task_file(tmp_path, server)), "--check-refs"]) == 0
    capsys.readouterr()
    plain = task_file(tmp_path, server, captioning=False)
    assert main(["validate", str(plain), "--check-refs"]) == 2
    err = capsys.readouterr().err
    assert "/dataset/caption_column" in err
    assert "dataset.caption_column 'text' is not a column of the dataset" in err
    assert len(server.requests) == 0  # checking references asks the backend nothing
