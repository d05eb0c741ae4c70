"""New tokens published: a textual-inversion file diffusers loads to the very trained
vectors, and ``bundle_emb`` keys in the kohya file as A1111 / Forge / ComfyUI read them.

Key patterns checked against the readers' source: AUTOMATIC1111/stable-diffusion-webui and
lllyasviel/stable-diffusion-webui-forge ``extensions-builtin/Lora/networks.py`` (a key
``bundle_emb.<name>.<rest>`` split at its first two dots; ``string_to_param.*`` or a
vector name such as ``clip_l`` / ``clip_g``) and comfyanonymous/ComfyUI
``comfy/sd1_clip.py`` ``load_embed`` (``bundle_emb.*.string_to_param.*``, else
``bundle_emb.*.<clip_l|clip_g>``; a textual-inversion file by its ``clip_l`` / ``clip_g``
key, else its one tensor).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.infer.pipeline import load_pipeline
from engine.lora.embeddings import (
    embedding_file_names,
    load_kohya_with_embeddings,
    load_textual_inversions,
)
from engine.lora.publish import publish_lora
from engine.store import storage
from engine.train.new_token_state import NEW_TOKENS_FILE
from engine.train.segment import SegmentOptions, run_segment
from tests.support.engine import make_task

TOKENS = {
    "lora.new_tokens": [
        {"token": "<sks>", "init_words": ["red"], "learning_rate": 5e-2},
        {"token": "<ohw>", "init_pattern": "^ci", "num_vectors": 2},
    ],
    "dataset.captions": {"prefix": "<sks> <ohw>, "},
    "train_args.num_train_steps": 2,
    "train_args.max_train_steps": 2,
}
SDXL = {"model.name": "loraflow/tiny-sdxl"}


def _published(tmp_path: Path, changes: dict) -> tuple:
    task = make_task(**TOKENS, **changes)
    result = run_segment(task, str(tmp_path / "run"), SegmentOptions(validate=False))
    published = publish_lora(result.checkpoint, task, str(tmp_path / "out"),
                             dataset_hash="d" * 64, captions=[], validation_images=[],
                             metrics_url=None, run_summary={"run_name": "tokens"})
    rows = load_tensors((Path(result.checkpoint) / NEW_TOKENS_FILE).read_bytes())
    return task, published, rows


@pytest.mark.parametrize("changes", [{}, SDXL], ids=["tiny-sd1", "tiny-sdxl"])
def test_diffusers_loads_the_textual_inversion_file_to_the_trained_vectors(
    tmp_path: Path, changes: dict
) -> None:
    task, published, rows = _published(tmp_path, changes)
    pipe, _, _ = load_pipeline(task.model, torch.float32, safety_checker=False)
    files = {t: storage.read_bytes(published[f"embedding:{t}"]) for t in ("<sks>", "<ohw>")}
    load_textual_inversions(pipe, pipe_family(task), files)
    pairs = [("text_encoder", pipe.tokenizer, pipe.text_encoder)]
    if changes:
        pairs.append(("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2))
    for prefix, tokenizer, encoder in pairs:
        matrix = encoder.get_input_embeddings().weight
        for token, names in (("<sks>", ["<sks>"]), ("<ohw>", ["<ohw>", "<ohw>_1"])):
            ids = tokenizer.convert_tokens_to_ids(names)
            assert torch.equal(matrix[ids], rows[f"new_tokens.{token}.{prefix}"]), (prefix, token)
    # and the pipeline writes a multi-vector token out in full, as training did
    assert pipe.maybe_convert_prompt("a <ohw> dog", pipe.tokenizer) == "a <ohw> <ohw>_1 dog"


@pytest.mark.parametrize("changes", [{}, SDXL], ids=["tiny-sd1", "tiny-sdxl"])
def test_kohya_file_bundles_the_embeddings_under_the_keys_a1111_and_comfyui_read(
    tmp_path: Path, changes: dict
) -> None:
    task, published, rows = _published(tmp_path, changes)
    kohya = load_tensors(storage.read_bytes(published["kohya"]))
    bundled = {k: v for k, v in kohya.items() if k.startswith("bundle_emb.")}
    if changes:
        names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
        expected = {f"bundle_emb.{t}.{n}": rows[f"new_tokens.{t}.{p}"]
                    for t in ("<sks>", "<ohw>") for p, n in names.items()}
    else:
        expected = {f"bundle_emb.{t}.string_to_param.*": rows[f"new_tokens.{t}.text_encoder"]
                    for t in ("<sks>", "<ohw>")}
    assert sorted(bundled) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(bundled[key], value)
        # A1111 / Forge: key_network.split(".", 2) -> bundle_emb, the token, the vector
        _, name, vector = key.split(".", 2)
        assert name in ("<sks>", "<ohw>") and vector in ("string_to_param.*", "clip_l", "clip_g")
    diffusers = load_tensors(storage.read_bytes(published["diffusers"]))
    assert not any(k.startswith("bundle_emb.") for k in diffusers)  # a plain diffusers LoRA
    ti = load_tensors(storage.read_bytes(published["embedding:<sks>"]))
    assert sorted(ti) == (["clip_g", "clip_l"] if changes else ["emb_params"])


@pytest.mark.parametrize("changes", [{}, SDXL], ids=["tiny-sd1", "tiny-sdxl"])
def test_kohya_file_with_bundled_embeddings_loads_in_diffusers(tmp_path: Path,
                                                               changes: dict) -> None:
    task, published, rows = _published(tmp_path, changes)
    pipe, _, _ = load_pipeline(task.model, torch.float32, safety_checker=False)
    load_kohya_with_embeddings(pipe, pipe_family(task), storage.read_bytes(published["kohya"]))
    assert pipe.unet.peft_config  # the LoRA is on
    ids = pipe.tokenizer.convert_tokens_to_ids(["<ohw>", "<ohw>_1"])
    matrix = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(matrix[ids], rows["new_tokens.<ohw>.text_encoder"])


def test_embedding_file_names_are_file_safe_and_distinct() -> None:
    names = embedding_file_names(["<sks>", "[sks]", "<>"])
    assert names == {"<sks>": "sks.safetensors", "[sks]": "sks_2.safetensors",
                     "<>": "token2.safetensors"}


def pipe_family(task):  # the family read from the model, as publish does
    from engine.model.loading import inspect_model

    return inspect_model(task.model)[1]
