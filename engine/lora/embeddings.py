"""New tokens' trained embeddings, published the ways users' tools read them.

Two forms, from the checkpoint's new-token rows (the EMA's when the EMA is published):

* bundled in the kohya LoRA file, so loading the LoRA brings its tokens along:
  ``bundle_emb.<token>.string_to_param.*`` (SD 1.x / 2.x) or ``bundle_emb.<token>.clip_l``
  and ``.clip_g`` (SDXL). AUTOMATIC1111 and Forge (``extensions-builtin/Lora/networks.py``:
  the key split at its first two dots, ``string_to_param.<k>`` into a
  ``{"string_to_param": {k: tensor}}`` embedding, any other rest kept by name) and
  ComfyUI (``comfy/sd1_clip.py`` ``load_embed``: keys ``bundle_emb.*.string_to_param.*``,
  else ``bundle_emb.*.<clip_l|clip_g>``) read these; so a token has no dot (the schema
  refuses one).
* a textual-inversion file per token, ``embeddings/<name>.safetensors``: ``emb_params``
  [vectors, width] for SD 1.x / 2.x, ``clip_l`` and ``clip_g`` for SDXL, the keys
  A1111's and ComfyUI's embedding loaders and diffusers' ``load_textual_inversion`` read.
  A1111 and ComfyUI call an embedding by its file name, so the name is the token made
  file-safe (``<sks>`` -> ``sks``), the token itself in the file's metadata.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from engine.lora.metadata import read_metadata, write_lora_file
from engine.model.family import Family
from engine.model.new_tokens import ENCODER_PREFIXES
from engine.store import storage
from engine.store.safetensors_io import dump
from engine.task.definition import TaskDefinition
from engine.train.new_token_state import (
    NEW_TOKENS_EMA_FILE,
    NEW_TOKENS_FILE,
    published_token_file,
)

EMBEDDINGS_DIR = "embeddings"
_CLIP_NAMES = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL's two encoders

Vectors = dict[str, torch.Tensor]  # encoder prefix -> [num_vectors, width]


def token_vectors(task: TaskDefinition, rows_file: bytes) -> dict[str, Vectors]:
    """{token: {encoder prefix: vectors}} from a checkpoint's new-token file."""
    rows = load_tensors(rows_file)
    return {spec.token: {p: rows[f"new_tokens.{spec.token}.{p}"] for p in ENCODER_PREFIXES
                         if f"new_tokens.{spec.token}.{p}" in rows}
            for spec in task.lora.new_tokens}


def textual_inversion_tensors(family: Family, vectors: Vectors) -> dict[str, torch.Tensor]:
    """One token's textual-inversion file content."""
    if family.is_sdxl:
        return {_CLIP_NAMES[p]: v.contiguous() for p, v in vectors.items()}
    return {"emb_params": vectors["text_encoder"].contiguous()}


def bundled_tensors(family: Family, token: str, vectors: Vectors) -> dict[str, torch.Tensor]:
    """One token's ``bundle_emb.*`` keys for the kohya LoRA file."""
    if family.is_sdxl:
        return {f"bundle_emb.{token}.{_CLIP_NAMES[p]}": v.contiguous()
                for p, v in vectors.items()}
    return {f"bundle_emb.{token}.string_to_param.*": vectors["text_encoder"].contiguous()}


def embedding_file_names(tokens: list[str]) -> dict[str, str]:
    """{token: file name}: the token's letters, digits, ``_`` and ``-`` (a number added
    when two tokens would share a name)."""
    names: dict[str, str] = {}
    for i, token in enumerate(tokens):
        stem = re.sub(r"[^A-Za-z0-9_-]+", "", token) or f"token{i}"
        name, n = stem, 2
        while name in names.values():
            name, n = f"{stem}_{n}", n + 1
        names[token] = name
    return {t: f"{n}.safetensors" for t, n in names.items()}


def _rows_file_for(task: TaskDefinition, role: str) -> str:
    """The checkpoint rows a weights file of ``role`` (kohya, kohya_raw, ...) goes with."""
    if role.endswith("_raw"):
        return NEW_TOKENS_FILE
    if role.endswith("_ema"):
        return NEW_TOKENS_EMA_FILE
    return published_token_file(task)


def bundle_new_tokens(task: TaskDefinition, family: Family, weights: dict[str, bytes],
                      roles: Mapping[str, str], checkpoint: Mapping[str, bytes]
                      ) -> dict[str, bytes]:
    """``weights`` with the new tokens bundled into each kohya file (as is without)."""
    if not task.lora.new_tokens:
        return weights
    out = dict(weights)
    for name, data in weights.items():
        if not roles[name].startswith("kohya"):
            continue  # the diffusers file stays a plain diffusers LoRA
        tensors = load_tensors(data)
        for token, vectors in token_vectors(task, checkpoint[_rows_file_for(task,
                                                                           roles[name])]).items():
            tensors |= bundled_tensors(family, token, vectors)
        out[name] = write_lora_file(tensors, read_metadata(data))  # hashes made anew
    return out


def write_embedding_files(task: TaskDefinition, family: Family,
                          checkpoint: Mapping[str, bytes], lora_dir: str) -> dict[str, str]:
    """Write ``lora_dir``/embeddings/<name>.safetensors per token; {token: URL}."""
    if not task.lora.new_tokens:
        return {}
    vectors = token_vectors(task, checkpoint[published_token_file(task)])
    names = embedding_file_names(list(vectors))
    urls = {}
    for token, per_encoder in vectors.items():
        url = storage.join(lora_dir, EMBEDDINGS_DIR, names[token])
        storage.write_bytes(url, dump(textual_inversion_tensors(family, per_encoder),
                                      {"loraflow_token": token}))
        urls[token] = url
    return urls


def load_textual_inversions(pipe: Any, family: Family, files: Mapping[str, bytes]) -> None:
    """Put published textual-inversion files ({token: bytes}) on a diffusers pipeline, as
    a user would (``load_textual_inversion``, per encoder for SDXL)."""
    for token, data in files.items():
        tensors = load_tensors(data)
        if family.is_sdxl:
            pipe.load_textual_inversion(tensors["clip_l"], token=token,
                                        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(tensors["clip_g"], token=token,
                                        text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion({"emb_params": tensors["emb_params"]}, token=token)


def load_trained_tokens(pipe: Any, task: TaskDefinition, family: Family,
                        checkpoint: Mapping[str, bytes]) -> None:
    """Put a checkpoint's new tokens (the published ones: the EMA when it is) on ``pipe``
    through the same textual-inversion files users get; nothing without new tokens."""
    if not task.lora.new_tokens:
        return
    vectors = token_vectors(task, checkpoint[published_token_file(task)])
    load_textual_inversions(pipe, family, {
        token: dump(textual_inversion_tensors(family, per_encoder), {"loraflow_token": token})
        for token, per_encoder in vectors.items()
    })


def load_kohya_with_embeddings(pipe: Any, family: Family, data: bytes) -> None:
    """Load a kohya file with bundled embeddings on a diffusers pipeline.

    diffusers' ``load_lora_weights`` refuses keys without ``lora`` (``bundle_emb.*``), so
    they are split off and loaded as textual inversions; the rest is the LoRA.
    """
    tensors = load_tensors(data)
    lora = {k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}
    per_token: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("bundle_emb."):
            _, token, vector = key.split(".", 2)
            per_token.setdefault(token, {})["emb_params" if vector.startswith(
                "string_to_param") else vector] = value
    pipe.load_lora_weights(lora)
    load_textual_inversions(pipe, family, {t: dump(v) for t, v in per_token.items()})


def new_tokens_section(task: TaskDefinition, urls: Mapping[str, str]) -> str:
    """The model card's words on the new tokens and where their embeddings are."""
    if not urls:
        return ""
    lines = ["", "## New tokens", "",
             "Trained embeddings of new tokens; write the token in prompts. The kohya file "
             "carries them (`bundle_emb`: AUTOMATIC1111 / Forge / ComfyUI load them with the "
             "LoRA); each is also a textual-inversion file:", ""]
    for token, url in urls.items():
        name = f"{EMBEDDINGS_DIR}/{storage.basename(url)}"
        lines.append(f"- `{token}`: `{name}` (diffusers: "
                     f"`pipe.load_textual_inversion(\"{name}\", token=\"{token}\")`).")
    return "\n".join(lines) + "\n"
