"""A LoRA trained on several subsets names each by its public name only (task.json, kohya
``ss_*`` keys, the card), with its repeats and images, and the buckets when on."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from engine.data.epoch_summary import BucketCount, EpochSummary, SubsetCount
from engine.lora.card import CardFiles, render_model_card
from engine.lora.metadata import (
    LoraFacts,
    epoch_of,
    kohya_metadata,
    public_task_dict,
    subset_names,
    task_json,
)
from engine.model.family import Family
from engine.task.validation import validate_document
from tests.support.engine import BASE_TASK, make_task

SD1 = Family(name="sd1", pipeline_class="StableDiffusionPipeline",
             text_encoders=(("tokenizer", "text_encoder"),), default_prediction_type="epsilon")


def _task(tmp_path: Path, **train_args: object):
    doc = {k: v for k, v in copy.deepcopy(BASE_TASK).items() if k != "dataset"}
    doc["datasets"] = [
        {"name": str(tmp_path / "home" / "alice" / "portraits"), "repeats": 3},
        {"url": "https://user:secret@data.example.com/sets/shapes.zip?X-Amz-Signature=abc"},
        {"shards": ["s3://bucket/shards/{0000..0009}.tar", str(tmp_path / "more.tar")]},
    ]
    doc["train_args"].update(train_args)
    return validate_document(doc)


EPOCH = EpochSummary(
    images=9, images_per_epoch=15, batches_per_epoch=5, batch_size=4,
    buckets=[BucketCount("48x80", 2, 6, 2), BucketCount("64x64", 7, 9, 3)],
    subsets=[SubsetCount("portraits", 3, 3, 9), SubsetCount("shapes.zip", 4, 1, 4),
             SubsetCount("s3://bucket/shards/{0000..0009}.tar (+1 more)", 2, 1, 2)],
)


def test_each_subset_is_published_by_its_public_name(tmp_path: Path) -> None:
    task = _task(tmp_path)
    published = public_task_dict(task)
    assert "dataset" not in published  # a task document sets one of dataset, datasets
    names = [d.get("name") or d.get("url") or d["shards"] for d in published["datasets"]]
    assert names == ["portraits", "https://data.example.com/sets/shapes.zip",
                     ["s3://bucket/shards/{0000..0009}.tar", "more.tar"]]
    text = task_json(task)
    assert str(tmp_path) not in text and "secret" not in text and "Signature" not in text
    assert validate_document(json.loads(text)).datasets[0].repeats == 3  # still a task
    assert subset_names(task) == ["portraits", "https://data.example.com/sets/shapes.zip",
                                  "s3://bucket/shards/{0000..0009}.tar (+1 more)"]


def test_kohya_keys_list_subsets_repeats_and_buckets(tmp_path: Path) -> None:
    task = _task(tmp_path, buckets={"step": 16})
    meta = kohya_metadata(LoraFacts(task, SD1, "t", 1, "h", epoch=EPOCH))
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert dirs["portraits"] == {"n_repeats": 3, "img_count": 3}
    assert meta["ss_num_train_images"] == "15"
    assert meta["ss_enable_bucket"] == "True"
    info = json.loads(meta["ss_bucket_info"])["buckets"]
    assert info["0"] == {"resolution": [48, 80], "count": 6}
    assert str(tmp_path) not in repr(meta)


def test_without_an_epoch_summary_the_keys_are_as_before() -> None:
    meta = kohya_metadata(LoraFacts(make_task(), SD1, "t", 1, "h"))
    assert not {"ss_dataset_dirs", "ss_num_train_images", "ss_bucket_info"} & set(meta)


def test_the_card_lists_subsets_and_buckets(tmp_path: Path) -> None:
    task = _task(tmp_path, buckets={"step": 16})
    card = render_model_card(LoraFacts(task, SD1, "t", 1, "h", epoch=EPOCH), CardFiles(), [])
    assert "## Training data" in card
    assert "| `portraits` | 3 | 3 | 9 |" in card
    assert "| 48x80 | 2 | 6 | 2 |" in card
    assert str(tmp_path) not in card


def test_the_epoch_travels_in_the_run_summary() -> None:
    from dataclasses import asdict

    assert epoch_of({"dataset": {"count": 9, "epoch": asdict(EPOCH)}}) == EPOCH
    assert epoch_of({"dataset": {"count": 9}}) is None
