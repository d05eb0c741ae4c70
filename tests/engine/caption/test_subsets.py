"""The task's subsets captioned: a dataset captioned before is found without a backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.caption.backend import CaptionOutcome
from engine.caption.subsets import caption_subsets
from engine.data.prepared import load_dataset_for_task, prepare_subsets
from tests.engine.caption.test_step import Scripted, captions_of
from tests.support.datasets import image_folder, png
from tests.support.engine import make_task

API = {"backend": "openai", "model": "gpt-4o-mini", "base_url": "https://api.example.com/v1",
       "api_key_env": "LORAFLOW_TEST_NO_SUCH_KEY"}


def test_a_worker_without_the_api_key_trains_on_the_captions_made_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caption step ran where the key is; a segment elsewhere (no key, no client)
    reads the committed captions: no backend is built, nothing is asked again."""
    folder = image_folder(tmp_path / "src", [("a.png", png(color=(200, 0, 0)), ""),
                                             ("b.png", png(color=(0, 200, 0)), "")])
    task = make_task(**{"dataset": {"name": str(folder)}, "captioning": API})
    data_root = str(tmp_path / "data")
    manifests = prepare_subsets(task, data_root)
    scripted = Scripted([CaptionOutcome("a red square"), CaptionOutcome("a green square")])
    made, done = caption_subsets(task, manifests, str(tmp_path / "captions"),
                                 captioner=lambda args: scripted)
    assert done.captioned == 2 and captions_of(made[0].address)[0] == ["a red square"]

    monkeypatch.delenv(API["api_key_env"], raising=False)

    def no_backend(args: object) -> None:
        raise AssertionError("a backend was built although the captions exist")

    again, found = caption_subsets(task, manifests, str(tmp_path / "elsewhere"),
                                   captioner=no_backend)
    assert again == made and (found.captioned, found.from_cache) == (0, 2)
    data = load_dataset_for_task(task, data_root)  # the real backend would need the key
    assert data.content_hash != manifests[0].content_hash
