"""New-token embeddings a user brings to ``loraflow generate``: the ``bundle_emb`` of a
kohya file, and textual-inversion files (``--embedding``); checked against the model's
text encoders, then put on the pipeline so the tokens work in prompts.

Vector names, as :mod:`engine.lora.embeddings` writes them and A1111 / ComfyUI read them:
``string_to_param.*`` (bundle) or ``emb_params`` (file) for the one encoder of SD 1.x /
2.x (ComfyUI also takes ``clip_l`` there), ``clip_l`` and ``clip_g`` for SDXL's two. A
vector set that does not fit the model (an SDXL embedding on SD 1.x, a width that is not
the encoder's) is refused with the token named: diffusers would otherwise fail deep
inside, or an embedding would silently miss one encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from engine.errors import LoraflowError
from engine.model.family import Family

ONE_ENCODER_NAMES = ("string_to_param.*", "emb_params", "clip_l")
SDXL_NAMES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}

Vectors = dict[str, torch.Tensor]  # text encoder (pipeline attribute) -> [vectors, width]


class EmbeddingRefused(LoraflowError):
    """An embedding that does not fit the model's text encoders."""


def encoder_vectors(token: str, named: Mapping[str, torch.Tensor], family: Family,
                    where: str) -> Vectors:
    """{text encoder: vectors} of one token's named vectors, for ``family``'s encoders."""
    if family.is_sdxl:
        missing = [n for n in SDXL_NAMES if n not in named]
        if missing:
            raise EmbeddingRefused(
                f"{where}: embedding {token!r} has no {' or '.join(missing)} vectors "
                f"(it has {', '.join(sorted(named))}); an SDXL model needs clip_l and clip_g"
            )
        return {encoder: _matrix(named[n]) for n, encoder in SDXL_NAMES.items()}
    if "clip_g" in named and not any(n in named for n in ONE_ENCODER_NAMES):
        raise EmbeddingRefused(
            f"{where}: embedding {token!r} is for SDXL's second text encoder (clip_g); this "
            f"{family.name} model has one text encoder"
        )
    found = next((n for n in ONE_ENCODER_NAMES if n in named), None)
    if found is None and len(named) == 1:
        found = next(iter(named))
    if found is None:
        raise EmbeddingRefused(f"{where}: embedding {token!r} has none of "
                               f"{', '.join(ONE_ENCODER_NAMES)} (it has {', '.join(named)})")
    return {"text_encoder": _matrix(named[found])}


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(1, -1) if tensor.dim() == 1 else tensor


def token_from_file(metadata: Mapping[str, str], file_name: str) -> str:
    """The token a textual-inversion file is called by: the one loraflow recorded in it,
    else the file's name without ``.safetensors`` (how A1111 and ComfyUI call it)."""
    return metadata.get("loraflow_token") or file_name.removesuffix(".safetensors")


def summary(token: str, named: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What ``inspect`` says of one embedding: its token, vectors per encoder, vector names."""
    vectors = {name: int(_matrix(t).shape[0]) for name, t in sorted(named.items())}
    return {"token": token, "vectors": max(vectors.values(), default=0),
            "encoders": sorted(vectors)}


def load_embeddings(pipe: Any, embeddings: Mapping[str, Vectors], where: str) -> None:
    """Put {token: {text encoder: vectors}} on ``pipe`` with diffusers'
    ``load_textual_inversion`` (per encoder), widths checked first."""
    for token, vectors in embeddings.items():
        for encoder_name, matrix in vectors.items():
            encoder = getattr(pipe, encoder_name, None)
            if encoder is None:
                raise EmbeddingRefused(f"{where}: embedding {token!r} is for {encoder_name}, "
                                       "which this model does not have")
            width = encoder.get_input_embeddings().weight.shape[1]
            if matrix.shape[-1] != width:
                raise EmbeddingRefused(
                    f"{where}: embedding {token!r} has vectors of width {matrix.shape[-1]}; "
                    f"this model's {encoder_name} has width {width}"
                )
            tokenizer = getattr(pipe, encoder_name.replace("text_encoder", "tokenizer"))
            try:
                pipe.load_textual_inversion(matrix, token=token, text_encoder=encoder,
                                            tokenizer=tokenizer)
            except ValueError as exc:  # e.g. the token is already a word of the tokenizer
                raise EmbeddingRefused(f"{where}: embedding {token!r}: {exc}") from None
