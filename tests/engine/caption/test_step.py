"""The caption step on real prepared datasets, with the tiny local captioning model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.caption.backend import CaptionError, CaptionOutcome, ImageToCaption
from engine.caption.local import LocalCaptioner
from engine.caption.step import caption_dataset
from engine.data.layout import open_dataset
from engine.task.definition import CaptioningArgs, DatasetArgs
from tests.support.datasets import image_folder, png, prepare


def captioning(**changes: object) -> CaptioningArgs:
    return CaptioningArgs(backend="transformers", model="loraflow/tiny-captioner",
                          batch_size=2, max_length=8, **changes)


@pytest.fixture
def prepared(tmp_path: Path):
    """Four images: two captioned, two with an empty caption."""
    folder = image_folder(tmp_path / "src", [
        ("a.png", png(color=(200, 0, 0)), "a red square"),
        ("b.png", png(color=(0, 200, 0)), ""),
        ("c.png", png(color=(0, 0, 200)), "a blue square"),
        ("d.png", png(color=(90, 90, 90)), ""),
    ])
    return prepare(DatasetArgs(name=str(folder)), tmp_path / "prepared", tmp_path)


class Scripted:
    """A backend that answers from a script (for answers no tiny model gives: empty,
    refused); it records what it was asked."""

    def __init__(self, answers: Sequence[CaptionOutcome]) -> None:
        self._answers = list(answers)
        self.asked: list[str] = []

    @property
    def fingerprint(self) -> dict[str, str]:
        return {"backend": "scripted"}

    def caption(self, images: Sequence[ImageToCaption]) -> list[CaptionOutcome]:
        self.asked += [i.name for i in images]
        return [self._answers.pop(0) for _ in images]


def captions_of(address: str) -> list[list[str]]:
    dataset = open_dataset(address)
    return [dataset.captions(i) for i in range(len(dataset))]


def test_mode_missing_captions_only_the_images_without_one(prepared, tmp_path):
    args = captioning()
    report = caption_dataset(prepared, args, str(tmp_path / "captions"), LocalCaptioner(args))
    captions = captions_of(report.manifest.address)
    assert (report.captioned, report.from_cache, report.kept) == (2, 0, 2)
    assert captions[0] == ["a red square"] and captions[2] == ["a blue square"]
    assert all(c[0].strip() for c in (captions[1], captions[3]))
    assert report.manifest.content_hash != prepared.content_hash
    assert report.manifest.address.startswith(prepared.address + "-captioned-")
    assert captions_of(prepared.address)[1] == [""]  # the original stays as it was


def test_a_rerun_captions_nothing_and_finds_the_same_dataset(prepared, tmp_path):
    args = captioning()
    first = caption_dataset(prepared, args, str(tmp_path / "captions"), LocalCaptioner(args))
    again = caption_dataset(prepared, args, str(tmp_path / "captions"), LocalCaptioner(args))
    assert (again.captioned, again.from_cache) == (0, 2)
    assert again.manifest == first.manifest


def test_a_dataset_captioned_before_is_used_as_it_is_without_asking_the_backend(
        prepared, tmp_path):
    """Another machine (its own empty caption cache) finds the captioned dataset in the
    shared data folder and trains on those captions, even from a backend whose answers
    would differ now."""
    args = captioning()
    first = caption_dataset(prepared, args, str(tmp_path / "captions"), LocalCaptioner(args))

    class Varying(Scripted):
        fingerprint = LocalCaptioner(args).fingerprint

    other = Varying([CaptionOutcome("something else")] * 4)
    again = caption_dataset(prepared, args, str(tmp_path / "elsewhere"), other)
    assert other.asked == []
    assert again.manifest == first.manifest
    assert (again.captioned, again.from_cache, again.kept) == (0, 2, 2)
    assert [p["caption"] for p in again.pairs] == [p["caption"] for p in first.pairs]


def test_mode_all_replaces_every_caption_with_the_template(prepared, tmp_path):
    args = captioning(mode="all", trigger="sks", caption_template="{trigger}, {caption}")
    report = caption_dataset(prepared, args, str(tmp_path / "captions"), LocalCaptioner(args))
    assert (report.captioned, report.kept) == (4, 0)
    captions = captions_of(report.manifest.address)
    assert all(c[0].startswith("sks, ") and "square" not in c[0] for c in captions)


@pytest.mark.parametrize("mode", ["prepend", "append"])
def test_prepend_and_append_join_the_generated_text_to_the_existing_caption(
        prepared, tmp_path, mode):
    args = captioning(mode=mode)
    report = caption_dataset(prepared, args, str(tmp_path / "captions"), LocalCaptioner(args))
    first = captions_of(report.manifest.address)[0][0]
    generated = captions_of(report.manifest.address)[1][0]  # had none: generated text only
    assert first == (f"{generated}, a red square" if mode == "prepend"
                     else f"a red square, {generated}")


def test_an_empty_or_refused_answer_keeps_the_image_uncaptioned_with_the_reason(
        prepared, tmp_path):
    backend = Scripted([CaptionOutcome(None, "empty answer"),
                        CaptionOutcome("I'm sorry, I can't describe people")])
    report = caption_dataset(prepared, captioning(), str(tmp_path / "c"), backend)
    assert [u["reason"] for u in report.uncaptioned] == [
        "empty answer", "refused: I'm sorry, I can't describe people"]
    assert captions_of(report.manifest.address)[1] == [""]
    assert report.manifest.count == 4


def test_on_empty_error_stops_naming_the_image_after_caching_the_answers(prepared, tmp_path):
    args = captioning(on_empty="error")
    backend = Scripted([CaptionOutcome("The image shows a cat"), CaptionOutcome(None, "empty")])
    with pytest.raises(CaptionError, match=r"images/000003\.png \(empty\)"):
        caption_dataset(prepared, args, str(tmp_path / "c"), backend)
    again = Scripted([])
    with pytest.raises(CaptionError):
        caption_dataset(prepared, args, str(tmp_path / "c"), again)
    assert again.asked == []


def test_answers_are_cleaned_before_they_are_written(prepared, tmp_path):
    backend = Scripted([CaptionOutcome('"The image shows: A Cat."'), CaptionOutcome("a dog")])
    report = caption_dataset(prepared, captioning(lowercase=True), str(tmp_path / "c"), backend)
    assert captions_of(report.manifest.address)[1] == ["a cat."]


def test_the_captions_file_is_an_imagefolder_that_prepares_back_to_the_same_records(
        prepared, tmp_path):
    args = captioning()
    report = caption_dataset(prepared, args, str(tmp_path / "captions"), LocalCaptioner(args))
    lines = [json.loads(x) for x in Path(report.metadata).read_text().splitlines()]
    assert [x["file_name"] for x in lines] == [f"images/00000{i}.png" for i in range(4)]
    again = prepare(DatasetArgs(name=report.manifest.address), tmp_path / "again", tmp_path)
    assert captions_of(again.address) == captions_of(report.manifest.address)


def test_a_crash_mid_way_keeps_the_answers_of_the_batches_before_it(prepared, tmp_path):
    class Dies(Scripted):
        def caption(self, images):
            if self.asked:
                raise CaptionError("backend down")
            return super().caption(images)

    args = captioning(mode="all")  # four images, batches of two
    with pytest.raises(CaptionError, match="backend down"):
        caption_dataset(prepared, args, str(tmp_path / "c"), Dies([CaptionOutcome("x")] * 2))
    resumed = Scripted([CaptionOutcome("y")] * 2)
    report = caption_dataset(prepared, args, str(tmp_path / "c"), resumed)
    assert (report.from_cache, report.captioned) == (2, 2)
    assert resumed.asked == ["images/000002.png", "images/000003.png"]
