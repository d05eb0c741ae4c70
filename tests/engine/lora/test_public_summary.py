"""The published run summary and task name places without local paths (public_summary.py).

The flow test (tests/flows/test_published_files_hold_no_local_paths.py) scans what a real
run publishes; these pin the rules on the forms a run on another storage would give:
``file://`` and ``s3://`` run folders, caches outside the run, overrides, and the task
fields of the sections a cheap run does not use (DreamBooth, captioning).
"""

from __future__ import annotations

import json

import pytest

from engine.lora.metadata import public_task_dict, task_json
from engine.lora.public_summary import public_override, public_run_summary, relative_location
from tests.support.engine import make_task

RUN = "/home/alice/runs/cats"


def _summary(out: str) -> dict:
    return {
        "output_dir": out, "run_name": "cats", "checkpoint": f"{out}/segments/0001/checkpoint",
        "cache": {"address": "/home/alice/.cache/loraflow/cache/abc123", "built_now": True},
        "segment_results": [{"index": 0, "checkpoint": f"{out}/segments/0000/checkpoint",
                             "metrics": f"{out}/segments/0000/metrics/metrics.jsonl"}],
        "overrides": ["lora.rank=4", "dataset.name=/home/alice/photos"],
    }


@pytest.mark.parametrize("out", [RUN, f"file://{RUN}", "s3://bucket/runs/cats", "runs/cats"])
def test_places_inside_the_run_are_relative_and_outside_by_their_last_part(out: str) -> None:
    published = public_run_summary(_summary(out), out)
    assert "output_dir" not in published
    assert published["checkpoint"] == "segments/0001/checkpoint"
    assert published["segment_results"] == [{
        "index": 0, "checkpoint": "segments/0000/checkpoint",
        "metrics": "segments/0000/metrics/metrics.jsonl",
    }]
    assert published["cache"] == {"address": "abc123", "built_now": True}
    assert published["overrides"] == ["lora.rank=4", "dataset.name=photos"]
    assert "alice" not in json.dumps(published) and "bucket" not in json.dumps(published)


def test_a_file_url_run_folder_matches_places_given_as_plain_paths() -> None:
    assert relative_location(f"{RUN}/lora", f"file://{RUN}/") == "lora"
    assert relative_location(RUN, RUN) == "."
    assert relative_location("/home/alice/runs/cats-2/lora", RUN) == "lora"  # not inside
    assert relative_location("s3://other/cache/x?X-Amz-Signature=s", RUN) == "x"


@pytest.mark.parametrize(("text", "shown"), [
    ("dataset.name=/home/alice/photos", "dataset.name=photos"),
    ('validation.prompts_file="~/prompts.txt"', 'validation.prompts_file="prompts.txt"'),
    ('datasets.0.shards=["/data/a/{0000..0009}.tar"]', 'datasets.0.shards=["{0000..0009}.tar"]'),
    ("dataset.url=https://u:pw@host/x.zip?sig=1", "dataset.url=https://host/x.zip"),
    ("model.name=loraflow/tiny-sd1", "model.name=loraflow/tiny-sd1"),
    ("validation.prompt=/a prompt, not a place", "validation.prompt=/a prompt, not a place"),
    ("train_args.learning_rate=1e-4", "train_args.learning_rate=1e-4"),
])
def test_an_override_of_a_location_field_shows_the_public_name(text: str, shown: str) -> None:
    assert public_override(text) == shown


def test_section_files_and_folders_are_published_by_their_last_part() -> None:
    task = make_task(**{
        "validation.prompts_file": "/home/alice/prompts.txt",
        "dreambooth": {"class_prompt": "a dog", "class_data_dir": "file:///home/alice/dogs",
                       "num_class_images": 2},
        "captioning": {"backend": "openai", "model": "/home/alice/models/blip",
                       "base_url": "http://bob:pw@localhost:11434/v1?token=t"},
    })
    data = public_task_dict(task)
    assert data["validation"]["prompts_file"] == "prompts.txt"
    assert data["dreambooth"]["class_data_dir"] == "dogs"
    assert data["captioning"]["model"] == "blip"
    assert data["captioning"]["base_url"] == "http://localhost:11434/v1"
    assert "alice" not in task_json(task) and "pw" not in task_json(task)


def test_a_hub_captioning_model_keeps_its_id() -> None:
    task = make_task(captioning={"backend": "transformers", "model": "Salesforce/blip-base"})
    assert public_task_dict(task)["captioning"]["model"] == "Salesforce/blip-base"
