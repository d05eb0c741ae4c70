"""Publishing writes both LoRA files with their metadata, the card and the task, the same
bytes every time, and nothing secret."""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_tensors

from engine.infer.validation import png_bytes
from engine.lora.formats import comfyui_unmapped_keys
from engine.lora.metadata import LoraFacts, lora_metadata, read_metadata, write_lora_file
from engine.lora.publish import publish_lora
from engine.lora.weights import LORA_FILE
from engine.model.loading import inspect_model
from engine.store import storage
from engine.store.commit import commit_checkpoint
from engine.task.definition import ModelArgs, TaskDefinition
from tests.engine.lora.test_formats import (
    ALPHA,
    RANK,
    MadeLora,
    load_pipeline_with,
    make_lora,
    unet_output,
)

SECRET_URL = "https://alice:hunter2@data.example.com/sets/shapes.zip?X-Amz-Signature=abc123"
CAPTIONS = ["a red circle on white", "a blue square on white", "a red square", "a red circle"]
SUMMARY = {
    "run_name": "Shapes v1",
    "started_at": "2024-05-01T10:00:00Z",
    "finished_at": "2024-05-01T10:30:00+00:00",
    "segments": 3,
}


def make_task(model: str = "loraflow/tiny-sd1", **output) -> TaskDefinition:
    return TaskDefinition.model_validate({
        "model": {"name": model},
        "dataset": {"url": SECRET_URL},
        "validation": {"num_images": 1, "num_inference_steps": 2},
        "train_args": {"resolution": 64, "learning_rate": 1e-4, "max_train_steps": 12},
        "lora": {"rank": RANK, "alpha": ALPHA},
        "seed": 5,
        **({"output": output} if output else {}),
    })


def data_offset(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.fixture(scope="module")
def unet_lora(tiny_sd1: str) -> MadeLora:
    """What training commits: a UNet-only diffusers file."""
    return make_lora(tiny_sd1, "sd1", text_encoders=False)


@pytest.fixture
def run_dir(unet_lora: MadeLora) -> str:
    """A memory:// run folder with a committed checkpoint and two validation PNGs."""
    root = f"memory://publish-{uuid.uuid4().hex}"
    checkpoint = storage.join(root, "checkpoint")
    commit_checkpoint(
        checkpoint,
        {LORA_FILE: unet_lora.diffusers_bytes, "training_state.json": b"{}"},
        meta={"global_step": 12, "task_fingerprint": "f" * 16, "finished": True},
    )
    for i, colour in enumerate(("red", "blue")):
        image = Image.new("RGB", (8, 8), colour)
        storage.write_bytes(storage.join(root, "validation", f"{i:02d}.png"), png_bytes(image, "p"))
    storage.write_bytes(storage.join(root, "metrics.jsonl"), b'{"step": 1, "loss": 0.5}\n')
    return root


def publish(run_dir: str, task: TaskDefinition, output: str) -> dict:
    return publish_lora(
        storage.join(run_dir, "checkpoint"),
        task,
        output,
        dataset_hash="d" * 64,
        captions=CAPTIONS,
        validation_images=[storage.join(run_dir, "validation", f"{i:02d}.png") for i in (0, 1)],
        metrics_url=storage.join(run_dir, "metrics.jsonl"),
        run_summary=SUMMARY,
    )


def snapshot(url: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(storage.join(url, name)) for name in storage.list_files(url)}


# -- publish ---------------------------------------------------------------------------


def test_publish_writes_both_files_card_task_and_images(run_dir: str, tiny_sd1: str):
    out = publish(run_dir, make_task(), storage.join(run_dir, "out"))
    files = snapshot(out["lora_dir"])
    assert sorted(files) == [
        "README.md",
        "loraflow_shapes_v1.safetensors",
        "metrics.jsonl",
        LORA_FILE,
        "run_summary.json",
        "task.json",
        "validation/00.png",
        "validation/01.png",
    ]
    assert out["kohya"].endswith("/lora/loraflow_shapes_v1.safetensors")
    assert out["diffusers"].endswith(f"/lora/{LORA_FILE}")
    kohya = load_tensors(files["loraflow_shapes_v1.safetensors"])
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {ALPHA}
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    assert comfyui_unmapped_keys(kohya, "sd1", [n for n, _ in unet.named_modules()]) == []
    assert json.loads(files["run_summary.json"])["segments"] == 3


def test_publishing_twice_writes_the_same_bytes(run_dir: str, tmp_path: Path):
    first = snapshot(publish(run_dir, make_task(), str(tmp_path / "run"))["lora_dir"])
    second = snapshot(publish(run_dir, make_task(), str(tmp_path / "run"))["lora_dir"])
    assert first == second
    assert (tmp_path / "run" / "lora" / LORA_FILE).is_file()  # local paths work too


def test_kohya_only_task_publishes_only_the_kohya_file(run_dir: str):
    output = storage.join(run_dir, "out")
    publish(run_dir, make_task(), output)  # both formats first
    out = publish(run_dir, make_task(lora_formats=["kohya"]), output)
    names = storage.list_files(out["lora_dir"])
    assert [n for n in names if n.endswith(".safetensors")] == ["loraflow_shapes_v1.safetensors"]
    assert out["diffusers"] is None
    card = storage.read_bytes(out["readme"]).decode()
    assert LORA_FILE not in card and "loraflow_shapes_v1.safetensors" in card


def test_published_files_hold_no_credentials(run_dir: str):
    out = publish(run_dir, make_task(), storage.join(run_dir, "out"))
    for name, data in snapshot(out["lora_dir"]).items():
        if name.endswith((".png", ".jsonl")):
            continue
        assert b"hunter2" not in data and b"abc123" not in data and b"alice" not in data, name
    task = json.loads(storage.read_bytes(out["task"]))
    assert task["dataset"]["url"] == "https://data.example.com/sets/shapes.zip"
    assert task["lora"] == {**task["lora"], "rank": RANK, "alpha": ALPHA}


def test_model_card_says_how_to_load_the_lora_everywhere(run_dir: str):
    out = publish(run_dir, make_task(), storage.join(run_dir, "out"))
    card = storage.read_bytes(out["readme"]).decode()
    assert f'load_lora_weights("path/to/this/folder", weight_name="{LORA_FILE}")' in card
    assert "ComfyUI/models/loras/" in card and "LoraLoader" in card
    assert "models/Lora/" in card and "<lora:loraflow_shapes_v1:1>" in card
    assert "![validation image 0](validation/00.png)" in card
    assert "`red` (3)" in card and "a blue square on white" in card  # trigger words, captions
    settings = ("| LoRA rank | 4 |", "| steps | 12 |", "| resolution | 64x64 |", "| seed | 5 |")
    assert all(setting in card for setting in settings)


# -- metadata --------------------------------------------------------------------------


def test_both_files_carry_kohya_modelspec_and_hash_metadata(run_dir: str):
    out = publish(run_dir, make_task(), storage.join(run_dir, "out"))
    for url in (out["diffusers"], out["kohya"]):
        data = storage.read_bytes(url)
        meta = read_metadata(data)
        assert meta["ss_network_module"] == "networks.lora"
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
        assert meta["ss_base_model_version"] == "sd_v1"
        assert meta["ss_resolution"] == "(64, 64)" and meta["ss_steps"] == "12"
        assert meta["ss_seed"] == "5" and meta["ss_dataset_hash"] == "d" * 64
        assert meta["ss_training_started_at"] == "1714557600.0"
        assert meta["modelspec.sai_model_spec"] == "1.0.0"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.title"] == "Shapes v1"
        assert meta["modelspec.resolution"] == "64x64"
        assert meta["modelspec.prediction_type"] == "epsilon"
        assert meta["modelspec.date"] == "2024-05-01"
        assert json.loads(meta["loraflow_task"])["lora"]["rank"] == RANK
        digest = hashlib.sha256(data[data_offset(data):]).hexdigest()
        assert meta["sshs_model_hash"] == digest
        assert meta["modelspec.hash_sha256"] == f"0x{digest}"
    diffusers_meta = read_metadata(storage.read_bytes(out["diffusers"]))
    assert diffusers_meta["modelspec.implementation"] == "https://github.com/huggingface/diffusers"
    assert '"unet.lora_alpha": 2.0' in diffusers_meta["lora_adapter_metadata"]
    kohya_meta = read_metadata(storage.read_bytes(out["kohya"]))
    assert kohya_meta["modelspec.implementation"] == "https://github.com/kohya-ss/sd-scripts"


def test_published_files_still_load_at_the_trained_strength(
    run_dir: str, unet_lora: MadeLora
):
    """The rewritten headers keep diffusers' adapter config and a readable layout."""
    out = publish(run_dir, make_task(), storage.join(run_dir, "out"))
    trained = unet_output(unet_lora.unet)
    for url in (out["diffusers"], out["kohya"]):
        pipe = load_pipeline_with(unet_lora.location, "sd1", storage.read_bytes(url))
        torch.testing.assert_close(unet_output(pipe.unet), trained)


@pytest.mark.parametrize(
    "name, architecture, base_version, prediction",
    [
        ("sd1", "stable-diffusion-v1/lora", "sd_v1", "epsilon"),
        ("sd2", "stable-diffusion-v2-768-v/lora", "sd_v2", "v"),  # tiny-sd2 is v-prediction
        ("sdxl", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0", "epsilon"),
    ],
)
def test_metadata_names_each_family_right(
    name: str, architecture: str, base_version: str, prediction: str,
    request: pytest.FixtureRequest,
):
    location = request.getfixturevalue(f"tiny_{name}")
    _, family = inspect_model(ModelArgs(name=location))
    facts = LoraFacts(make_task(location), family, "t", steps=3, dataset_hash="h")
    meta = lora_metadata(facts, "kohya")
    assert meta["modelspec.architecture"] == architecture
    assert meta["ss_base_model_version"] == base_version
    assert meta["modelspec.prediction_type"] == prediction
    assert "modelspec.date" not in meta  # no date given: none invented from the clock
    assert all(isinstance(v, str) for v in meta.values())


def test_tensor_hash_ignores_the_metadata(unet_lora: MadeLora):
    tensors = unet_lora.tensors
    a = write_lora_file(tensors, {"x": "1"})
    b = write_lora_file(tensors, {"x": "a much longer value that moves the data offset"})
    assert read_metadata(a)["sshs_model_hash"] == read_metadata(b)["sshs_model_hash"]
    assert a[data_offset(a):] == b[data_offset(b):]
