"""``inspect`` reads LyCORIS files: the algorithm (LoHa, LoKr, DoRA), rank or LoKr factor,
alpha, modules and bundled embeddings, and which tools load the file fully; the claim that
diffusers does not load LoHa / LoKr / bundle_emb is checked against diffusers itself."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.infer.generate import LoraFileRefused, format_report, inspect_lora
from engine.infer.pipeline import load_pipeline
from engine.lora.loaders import COMFYUI, DIFFUSERS
from engine.lora.metadata import read_metadata, write_lora_file
from engine.store import storage
from flows.cli.lora import add_commands
from tests.support.lycoris_runs import NEW_TOKENS, Published, published

TEXT_AND_UNET = {"text_encoder": 8, "unet": 32}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Published]:
    root = tmp_path_factory.mktemp("lycoris")
    made = {kind: published(root / kind, kind) for kind in ("loha", "lokr", "dora")}
    made["tokens"] = published(root / "tokens", "lora", **NEW_TOKENS)
    return made


def kohya(runs: dict[str, Published], kind: str) -> str:
    return runs[kind].files["kohya"]


def test_inspect_reports_loha_rank_alpha_and_modules(runs: dict[str, Published]) -> None:
    report = inspect_lora(kohya(runs, "loha"))
    assert (report["format"], report["algorithm"], report["family"]) == ("kohya", "loha", "sd1")
    assert report["ranks"] == [4] and report["alphas"] == [4.0] and report["scales"] == [1.0]
    assert report["components"] == TEXT_AND_UNET and report["modules"] == 40
    assert report["factors"] == [] and report["bundled_embeddings"] == []
    assert "to_q" in report["target_kinds"] and "q_proj" in report["target_kinds"]


def test_inspect_reports_lokr_factors_and_its_unit_scale(runs: dict[str, Published]) -> None:
    report = inspect_lora(kohya(runs, "lokr"))
    tensors = load_tensors(storage.read_bytes(kohya(runs, "lokr")))
    w1 = {f"{t.shape[0]}x{t.shape[1]}" for k, t in tensors.items() if k.endswith(".lokr_w1")}
    assert report["algorithm"] == "lokr" and report["factors"] == sorted(w1)
    assert report["ranks"] == []  # both factors whole: ComfyUI applies scale 1
    assert report["scales"] == [1.0] and report["modules"] == 40
    text = format_report(report)
    assert "algorithm:  lokr" in text and "factor:     " in text and "whole LoKr" in text


def test_inspect_reports_dora_in_both_files(runs: dict[str, Published]) -> None:
    assert inspect_lora(kohya(runs, "dora"))["algorithm"] == "dora"
    diffusers_file = inspect_lora(runs["dora"].files["diffusers"])
    assert diffusers_file["format"] == "diffusers" and diffusers_file["algorithm"] == "dora"
    # it adapts the text encoder, whose DoRA magnitudes diffusers does not load
    assert diffusers_file["loads_fully_in"] == []
    assert diffusers_file["other_tools"].startswith(
        f"{DIFFUSERS}: load_lora_weights leaves the text encoders' DoRA magnitudes untrained")


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_lycoris_files_load_fully_in_comfyui_not_in_diffusers(
    runs: dict[str, Published], kind: str
) -> None:
    report = inspect_lora(kohya(runs, kind))
    assert report["loads_fully_in"] == [COMFYUI]
    assert report["other_tools"].startswith("diffusers: load_lora_weights")
    assert "AUTOMATIC1111 / Forge" in report["other_tools"]


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_diffusers_refuses_loha_and_lokr_files_as_inspect_says(
    runs: dict[str, Published], kind: str
) -> None:
    pipe = _tiny_sd1_pipe(runs)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        _diffusers_load(pipe, storage.read_bytes(kohya(runs, kind)))


def test_diffusers_drops_dora_scale_as_inspect_says(runs: dict[str, Published]) -> None:
    pipe = _tiny_sd1_pipe(runs)
    _diffusers_load(pipe, storage.read_bytes(kohya(runs, "dora")))
    config = next(iter(pipe.unet.peft_config.values()))
    assert not config.use_dora  # loaded as a plain LoRA


def test_inspect_lists_bundled_embeddings_and_diffusers_refuses_them(
    runs: dict[str, Published],
) -> None:
    path = kohya(runs, "tokens")
    report = inspect_lora(path)
    assert report["algorithm"] == "lora" and report["modules"] == 40
    assert report["bundled_embeddings"] == [
        {"token": "<ohw>", "vectors": 2, "encoders": ["string_to_param.*"]},
        {"token": "<sks>", "vectors": 1, "encoders": ["string_to_param.*"]},
    ]
    assert report["loads_fully_in"] == [COMFYUI]
    assert "refuses bundle_emb" in report["other_tools"]
    assert "embedding:  <ohw>: 2 vector(s)" in format_report(report)
    pipe = _tiny_sd1_pipe(runs)
    with pytest.raises(ValueError):
        _diffusers_load(pipe, storage.read_bytes(path))


def test_tucker_cores_and_half_modules_are_refused_clearly(
    runs: dict[str, Published], tmp_path: Path
) -> None:
    data = storage.read_bytes(kohya(runs, "loha"))
    tensors = load_tensors(data)
    name = next(k for k in tensors if k.endswith(".hada_w1_a")).removesuffix(".hada_w1_a")
    tucker = {**tensors, f"{name}.hada_t1": torch.zeros(4, 4, 3, 3)}
    half = {k: v for k, v in tensors.items() if k != f"{name}.hada_w2_b"}
    for label, bad, message in (("tucker", tucker, "Tucker / CP"), ("half", half, "hada_w2_b")):
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(write_lora_file(bad, read_metadata(data)))
        with pytest.raises(LoraFileRefused, match=message):
            inspect_lora(str(path))


def test_inspect_command_prints_the_algorithm_as_text_and_json(
    runs: dict[str, Published], capsys: pytest.CaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    for argv in (["inspect", kohya(runs, "loha")], ["inspect", "--json", kohya(runs, "lokr")]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    text, printed = capsys.readouterr().out.split("\n{", 1)
    assert "algorithm:  loha" in text
    assert json.loads("{" + printed)["algorithm"] == "lokr"


def _tiny_sd1_pipe(runs: dict[str, Published]):
    pipe, _, _ = load_pipeline(runs["loha"].task.model, torch.float32, safety_checker=False)
    return pipe


def _diffusers_load(pipe, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "lora.safetensors").write_bytes(data)
        pipe.load_lora_weights(tmp, weight_name="lora.safetensors")
