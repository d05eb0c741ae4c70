"""New tokens (pivotal tuning): added to the tokenizers, their embeddings trained alone.

Each text encoder's token embedding is wrapped by :class:`SplicedEmbedding`: the original
matrix stays as it was loaded (frozen, never written, so every old row keeps its bits)
and the new tokens' rows are small fp32 parameters of their own, spliced in wherever an
input id is a new token's. So the trained state is ``num_vectors x width`` numbers per
token and encoder, which is what the checkpoint holds and what is published.

A token of ``num_vectors`` > 1 enters the tokenizer as ``token, token_1, ...`` (the
names diffusers' ``load_textual_inversion`` gives a multi-vector embedding); captions
keep writing ``token``, and :func:`spelled_out` writes it as all its vectors before
tokenizing, as diffusers' pipelines do at inference (``maybe_convert_prompt``).
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import torch

from engine.errors import ConfigurationError
from engine.task.definition import NewTokenArgs, TaskDefinition

#: Per tokenizer (weakly): {token: "token token_1 ..."} for tokens of several vectors.
_SPELLINGS: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()

ENCODER_PREFIXES = ("text_encoder", "text_encoder_2")  # the diffusers LoRA file's names


class NewTokenError(ConfigurationError):
    """A new token cannot be added or initialised as the task asks."""


class SplicedEmbedding(torch.nn.Module):
    """A token embedding whose new rows are separate trainable parameters.

    ``base`` is the encoder's own ``nn.Embedding`` (frozen); ``rows[k]`` holds the
    vectors of the k-th new token, ``token_ids[k]`` their ids in the tokenizer.
    """

    def __init__(self, base: torch.nn.Embedding, token_ids: list[list[int]],
                 rows: list[torch.Tensor]) -> None:
        super().__init__()
        self.base = base
        self.token_ids = [list(ids) for ids in token_ids]
        self.rows = torch.nn.ParameterList([torch.nn.Parameter(r) for r in rows])

    @property
    def weight(self) -> torch.Tensor:
        """The original matrix (what code that reads ``.weight`` for a dtype expects)."""
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(0, self.base.num_embeddings - 1))
        for ids, rows in zip(self.token_ids, self.rows, strict=True):
            for j, token_id in enumerate(ids):
                out = torch.where((input_ids == token_id).unsqueeze(-1),
                                  rows[j].to(out.dtype), out)
        return out


def spelled_out(tokenizer: Any, caption: str) -> str:
    """``caption`` with each multi-vector token written as all its vectors."""
    for token, spelling in _SPELLINGS.get(tokenizer, {}).items():
        caption = re.sub(re.escape(token) + r"(?!_\d)", lambda _m, s=spelling: s, caption)
    return caption


def init_token_ids(tokenizer: Any, spec: NewTokenArgs, where: str) -> list[int]:
    """The existing token ids whose mean embedding starts ``spec``'s token, sorted."""
    if spec.init_pattern is not None:
        pattern = re.compile(spec.init_pattern)
        ids = sorted(i for t, i in tokenizer.get_vocab().items() if pattern.search(t))
        if not ids:
            raise NewTokenError(
                f"lora.new_tokens {spec.token!r}: init_pattern {spec.init_pattern!r} matches "
                f"no token of the {where} vocabulary (CLIP writes a word's end as '</w>', "
                "e.g. '^dog</w>$')"
            )
        return ids
    ids = []
    for word in spec.init_words or []:
        found = tokenizer(word, add_special_tokens=False).input_ids
        if not found:
            raise NewTokenError(f"lora.new_tokens {spec.token!r}: init word {word!r} has no "
                                f"token in the {where}")
        ids += found
    return sorted(ids)


def _check_new(tokenizer: Any, spec: NewTokenArgs, where: str) -> None:
    vocab = tokenizer.get_vocab()
    for name in spec.vector_names:
        if name in vocab or name.lower() in vocab:
            raise NewTokenError(f"lora.new_tokens {spec.token!r}: the {where} already has "
                                f"the token {name!r}; choose a new word, e.g. '<{name}>'")


_BEFORE, _AFTER = "a photo of", "dog"  # the words a token is checked between


def _plain_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids of the words around the checked token, before any token is added."""
    return (tokenizer(_BEFORE, add_special_tokens=False).input_ids,
            tokenizer(_AFTER, add_special_tokens=False).input_ids)


def _check_tokenizes(tokenizer: Any, spec: NewTokenArgs, ids: list[int],
                     plain: tuple[list[int], list[int]], where: str) -> None:
    """Inside a caption the token must become exactly its own ids, and the words around
    it their old ids (a token such as ``of`` would take over every ``of``)."""
    text = spelled_out(tokenizer, f"{_BEFORE} {spec.token} {_AFTER}")
    got = tokenizer(text, add_special_tokens=False).input_ids
    expected = plain[0] + ids + plain[1]
    if got != expected:
        raise NewTokenError(
            f"lora.new_tokens {spec.token!r} does not tokenize as a new token of its own in "
            f"the {where} ({text!r} gives ids {got}, expected {expected}): choose a word "
            "that is in no caption otherwise, e.g. '<sks>'"
        )


def add_new_tokens(task: TaskDefinition, base: Any) -> dict[str, torch.nn.Parameter]:
    """Add ``lora.new_tokens`` to every tokenizer and encoder of ``base``; return the
    trainable rows by name, ``new_tokens.<token>.<encoder prefix>`` ({} without tokens).

    Deterministic: each token starts as the mean (in float64, in sorted id order) of its
    init tokens' embeddings, every vector alike, cast to fp32.
    """
    specs = task.lora.new_tokens
    if not specs:
        return {}
    params: dict[str, torch.nn.Parameter] = {}
    for prefix, tokenizer, encoder in zip(ENCODER_PREFIXES, base.tokenizers, base.text_encoders,
                                          strict=False):
        where = "tokenizer" if prefix == "text_encoder" else "tokenizer_2"
        embedding = encoder.get_input_embeddings()
        if isinstance(embedding, SplicedEmbedding):
            raise NewTokenError(f"new tokens were already added to the {where}")
        rows, token_ids, plain = [], [], _plain_ids(tokenizer)
        for spec in specs:
            _check_new(tokenizer, spec, where)
            init = init_token_ids(tokenizer, spec, where)
            with torch.no_grad():
                mean = embedding.weight[init].double().mean(dim=0).float()
            rows.append(mean.expand(spec.num_vectors, -1).clone().to(embedding.weight.device))
        for spec in specs:
            tokenizer.add_tokens(spec.vector_names)
            ids = tokenizer.convert_tokens_to_ids(spec.vector_names)
            token_ids.append(ids)
            if spec.num_vectors > 1:
                _SPELLINGS.setdefault(tokenizer, {})[spec.token] = " ".join(spec.vector_names)
            _check_tokenizes(tokenizer, spec, ids, plain, where)
        spliced = SplicedEmbedding(embedding, token_ids, rows)
        encoder.set_input_embeddings(spliced)
        for spec, param in zip(specs, spliced.rows, strict=True):
            param.requires_grad_(True)
            params[f"new_tokens.{spec.token}.{prefix}"] = param
    return params


def token_rows(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """The new tokens' rows among a trainer's parameters."""
    return {k: p for k, p in params.items() if k.startswith("new_tokens.")}
