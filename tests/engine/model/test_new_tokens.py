"""Adding new tokens: initialised from the vocabulary as asked, tokenized to their own ids,
and refused plainly when they cannot be."""

from __future__ import annotations

import pytest
import torch

from engine.model.family import tokenize
from engine.model.loading import load_base_model
from engine.model.new_tokens import NewTokenError, add_new_tokens
from engine.task.validation import TaskValidationError
from tests.support.engine import make_task

SD1, SDXL = "loraflow/tiny-sd1", "loraflow/tiny-sdxl"


def _base(tokens: list[dict], model: str = SD1):
    task = make_task(**{"model.name": model, "lora.new_tokens": tokens})
    return task, load_base_model(task, torch.device("cpu"), with_vae=False)


def test_init_pattern_is_the_mean_of_the_matching_tokens_embeddings() -> None:
    task, base = _base([{"token": "<sks>", "init_pattern": "^ci"}], SDXL)
    tokenizers = list(base.tokenizers)
    matrices = [e.get_input_embeddings().weight.clone() for e in base.text_encoders]
    params = add_new_tokens(task, base)
    for prefix, tokenizer, matrix in zip(("text_encoder", "text_encoder_2"), tokenizers,
                                         matrices, strict=True):
        ids = sorted(i for t, i in tokenizer.get_vocab().items() if t.startswith("ci"))
        assert ids  # the pattern matches something in the tiny vocabulary
        expected = matrix[ids].double().mean(0).float()
        assert torch.equal(params[f"new_tokens.<sks>.{prefix}"].detach()[0], expected)


def test_init_words_average_their_tokens_and_every_vector_starts_alike() -> None:
    task, base = _base([{"token": "<sks>", "init_words": ["red", "circle"], "num_vectors": 3}])
    tokenizer, matrix = base.tokenizers[0], base.text_encoders[0].get_input_embeddings().weight
    ids = sorted(tokenizer("red", add_special_tokens=False).input_ids
                 + tokenizer("circle", add_special_tokens=False).input_ids)
    expected = matrix[ids].double().mean(0).float()
    rows = add_new_tokens(task, base)["new_tokens.<sks>.text_encoder"].detach()
    assert rows.shape == (3, matrix.shape[1]) and rows.dtype == torch.float32
    assert all(torch.equal(r, expected) for r in rows)


def test_captions_tokenize_to_the_new_ids_even_after_the_memo_saw_them() -> None:
    task, base = _base([{"token": "<ohw>", "init_words": ["red"], "num_vectors": 2}])
    tokenizer = base.tokenizers[0]
    before = tokenize(tokenizer, ["a <ohw> dog"])  # remembered with the old vocabulary
    add_new_tokens(task, base)
    new = tokenizer.convert_tokens_to_ids(["<ohw>", "<ohw>_1"])
    after = tokenize(tokenizer, ["a <ohw> dog"])[0].tolist()
    assert not set(new) & set(before[0].tolist())
    start = after.index(new[0])
    assert after[start:start + 2] == new  # the token is written as both its vectors


def test_the_encoder_gives_the_new_rows_for_the_new_ids_and_old_rows_elsewhere() -> None:
    task, base = _base([{"token": "<sks>", "init_words": ["red"]}])
    encoder = base.text_encoders[0]
    old = encoder.get_input_embeddings()
    params = add_new_tokens(task, base)
    spliced = encoder.get_input_embeddings()
    new_id = base.tokenizers[0].convert_tokens_to_ids("<sks>")
    ids = torch.tensor([[0, 5, new_id]])
    out = spliced(ids)
    assert torch.equal(out[0, :2], old(ids[:, :2])[0])
    assert torch.equal(out[0, 2], params["new_tokens.<sks>.text_encoder"][0].detach())


def test_a_pattern_matching_nothing_is_refused_naming_it() -> None:
    task, base = _base([{"token": "<sks>", "init_pattern": "^zzzqqq"}])
    with pytest.raises(NewTokenError, match=r"init_pattern '\^zzzqqq' matches no token"):
        add_new_tokens(task, base)


def test_a_token_the_tokenizer_has_is_refused() -> None:
    task, base = _base([{"token": "dog</w>", "init_words": ["red"]}])
    with pytest.raises(NewTokenError, match="already has the token 'dog</w>'"):
        add_new_tokens(task, base)


def test_a_token_that_takes_over_an_ordinary_word_is_refused() -> None:
    task, base = _base([{"token": "of", "init_words": ["red"]}])  # the vocabulary has of</w>
    with pytest.raises(NewTokenError, match="does not tokenize as a new token of its own"):
        add_new_tokens(task, base)


@pytest.mark.parametrize("token, message", [
    ({"token": "<a>"}, "exactly one of init_pattern and init_words"),
    ({"token": "<a>", "init_words": ["x"], "init_pattern": "x"}, "exactly one"),
    ({"token": "<a>", "init_pattern": "(["}, "is not a regular expression"),
    ({"token": "a.b", "init_words": ["x"]}, "/lora/new_tokens/0/token: .* does not match"),
    ({"token": "a b", "init_words": ["x"]}, "/lora/new_tokens/0/token: .* does not match"),
])
def test_the_schema_refuses_bad_token_definitions(token: dict, message: str) -> None:
    with pytest.raises(TaskValidationError, match=message):
        make_task(**{"lora.new_tokens": [token]})


def test_the_schema_refuses_a_token_named_twice() -> None:
    with pytest.raises(TaskValidationError, match="more than once"):
        make_task(**{"lora.new_tokens": [
            {"token": "<a>", "init_words": ["x"], "num_vectors": 2},
            {"token": "<a>_1", "init_words": ["x"]},
        ]})


def test_a_task_without_new_tokens_keeps_its_identity_bytes() -> None:
    task = make_task()
    assert "new_tokens" not in task.lora.stable_dump()
    assert not task.trains_text_encoder
    assert make_task(**{"lora.new_tokens": [{"token": "<a>", "init_words": ["x"]}]}
                     ).trains_text_encoder
