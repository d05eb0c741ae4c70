"""The local backend: a transformers model loaded through from_pretrained, offline."""

from __future__ import annotations

import hashlib
import time

import pytest
from PIL import Image

from engine.caption.backend import CaptionError, ImageToCaption
from engine.caption.local import LocalCaptioner
from engine.model.embedded.registry import resolve_model
from engine.task.definition import CaptioningArgs


def captioning(**changes: object) -> CaptioningArgs:
    fields = {"backend": "transformers", "model": "loraflow/tiny-captioner", "max_length": 6}
    return CaptioningArgs(**{**fields, **changes})


def items(n: int) -> list[ImageToCaption]:
    out = []
    for i in range(n):
        image = Image.new("RGB", (40 + i, 30), (i * 60, 255 - i * 60, 90))
        out.append(ImageToCaption(f"img{i}.png", hashlib.sha256(image.tobytes()).hexdigest(),
                                  image))
    return out


def test_the_tiny_captioner_captions_greedily_the_same_in_any_batch_size():
    one = LocalCaptioner(captioning(batch_size=1)).caption(items(3))
    three = LocalCaptioner(captioning(batch_size=3)).caption(items(3))
    assert [o.caption for o in one] == [o.caption for o in three]
    assert all(o.caption and len(o.caption.split()) <= 6 for o in one)


def test_an_unconditional_captioner_gets_no_prompt_so_the_prompt_is_not_fingerprinted():
    a = LocalCaptioner(captioning(prompt="Describe it."))
    b = LocalCaptioner(captioning(prompt="Something else."))
    assert a.prompting == "unconditional"
    assert a.fingerprint == b.fingerprint and a.fingerprint["prompt"] == ""


def test_the_fingerprint_names_model_revision_and_length_and_no_local_path():
    fingerprint = LocalCaptioner(captioning()).fingerprint
    assert fingerprint["model"] == "loraflow/tiny-captioner"
    assert (fingerprint["revision"], fingerprint["max_length"]) == ("main", "6")
    assert not any(resolve_model("loraflow/tiny-captioner") in v for v in fingerprint.values())


def test_a_folder_given_by_path_loads_through_the_same_from_pretrained_path():
    folder = resolve_model("loraflow/tiny-captioner")
    by_path = LocalCaptioner(captioning(model=folder)).caption(items(1))
    by_id = LocalCaptioner(captioning()).caption(items(1))
    assert by_path == by_id


def test_a_missing_hub_model_is_a_fast_clear_error_naming_it():
    started = time.monotonic()
    with pytest.raises(CaptionError, match=r"captioning model 'nobody/no-such-captioner'.*"
                                           r"offline mode is on"):
        LocalCaptioner(captioning(model="nobody/no-such-captioner"))
    assert time.monotonic() - started < 5


def test_a_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CaptionError, match="names no such local folder"):
        LocalCaptioner(captioning(model=str(tmp_path / "nothing-here")))


def test_a_model_that_is_not_a_captioner_is_refused_by_its_config(tiny_sd1):
    with pytest.raises(CaptionError, match="captioning model"):
        LocalCaptioner(captioning(model=f"{tiny_sd1}/text_encoder"))
