"""New tokens train with the LoRA: only their rows move, and k segments equal one run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from engine.data.prepared import load_dataset_for_task
from engine.model.loading import load_base_model, training_device
from engine.model.new_tokens import SplicedEmbedding
from engine.train.new_token_state import NEW_TOKENS_EMA_FILE, NEW_TOKENS_FILE
from engine.train.plan import TrainingPlan
from engine.train.samples import SampleSource
from engine.train.segment import SegmentOptions, run_segment
from engine.train.stream import batch_stream
from engine.train.trainer import build_trainer, train_step
from tests.support.engine import checkpoint_bytes, make_task, run_chain

TOKENS = {
    "lora.new_tokens": [
        {"token": "<sks>", "init_words": ["red"], "learning_rate": 5e-2},
        {"token": "<ohw>", "init_pattern": "^ci", "num_vectors": 2},
    ],
    "dataset.captions": {"prefix": "<sks> <ohw>, "},
}
SDXL = {"model.name": "loraflow/tiny-sdxl"}


def _token_bytes(checkpoint: str, name: str = NEW_TOKENS_FILE) -> bytes:
    return (Path(checkpoint) / name).read_bytes()


@pytest.mark.parametrize("changes", [{}, SDXL], ids=["sd1", "sdxl"])
def test_three_segments_equal_one_run_bitwise_with_new_tokens(tmp_path: Path,
                                                              changes: dict) -> None:
    one = run_chain(make_task(**TOKENS, **changes), tmp_path / "one")
    split = run_chain(make_task(**TOKENS, **changes, **{"train_args.num_train_steps": 3}),
                      tmp_path / "split")
    assert [r.global_step for r in split] == [3, 6, 8]
    assert checkpoint_bytes(one[0].checkpoint) == checkpoint_bytes(split[-1].checkpoint)
    assert _token_bytes(one[0].checkpoint) == _token_bytes(split[-1].checkpoint)


def test_ema_of_new_tokens_resumes_exactly(tmp_path: Path) -> None:
    ema = {"train_args.ema": {"decay": 0.5}}
    one = run_chain(make_task(**TOKENS, **ema), tmp_path / "one")
    split = run_chain(make_task(**TOKENS, **ema, **{"train_args.num_train_steps": 3}),
                      tmp_path / "split")
    for name in (NEW_TOKENS_FILE, NEW_TOKENS_EMA_FILE):
        assert _token_bytes(one[0].checkpoint, name) == _token_bytes(split[-1].checkpoint, name)
    assert _token_bytes(one[0].checkpoint) != _token_bytes(one[0].checkpoint,
                                                           NEW_TOKENS_EMA_FILE)


@pytest.mark.parametrize("changes", [{}, SDXL], ids=["sd1", "sdxl"])
def test_only_the_new_rows_train_and_the_old_embeddings_keep_their_bits(
    tmp_path: Path, changes: dict
) -> None:
    task = make_task(**TOKENS, **changes)
    result = run_segment(task, str(tmp_path / "s"), SegmentOptions(validate=False))
    trained = load_tensors(_token_bytes(result.checkpoint))
    assert sorted(trained) == sorted(
        f"new_tokens.{t}.{e}" for t in ("<sks>", "<ohw>")
        for e in (["text_encoder", "text_encoder_2"] if changes else ["text_encoder"]))
    assert trained["new_tokens.<ohw>.text_encoder"].shape[0] == 2  # num_vectors

    # the same training, stepped here: the frozen matrix is compared before and after
    dataset = load_dataset_for_task(task, None)
    base = load_base_model(task, training_device())
    before = [e.get_input_embeddings().weight.clone() for e in base.text_encoders]
    plan = TrainingPlan.for_task(task, dataset)
    tr = build_trainer(task, base, plan)
    start = {k: p.detach().clone() for k, p in tr.params.items() if k.startswith("new_tokens.")}
    source = SampleSource(task, dataset, base, None)
    stream = batch_stream(source, plan, 0, 3, workers=0)
    for _ in range(3):
        train_step(tr, stream)
    for encoder, old in zip(base.text_encoders, before, strict=True):
        spliced = encoder.get_input_embeddings()
        assert isinstance(spliced, SplicedEmbedding)
        assert not spliced.base.weight.requires_grad
        assert torch.equal(spliced.base.weight, old)  # bit for bit
    for name, value in start.items():
        assert not torch.equal(tr.params[name].detach(), value), name  # the rows learned


def test_final_validation_renders_with_the_trained_tokens(tmp_path: Path) -> None:
    """The run's validation images are of what users load: the LoRA file and the tokens'
    embeddings. A prompt with the token renders otherwise when the tokens are left out
    (the tokenizer then splits "<sks>" into pieces)."""
    from engine.infer.validation import validate_checkpoint

    prompt = {"validation.prompt": "<sks> <ohw>, a shape"}
    task = make_task(**TOKENS, **prompt)
    checkpoint = run_chain(task, tmp_path / "run")[-1].checkpoint
    data = load_dataset_for_task(task, None)
    with_tokens = validate_checkpoint(task, checkpoint, str(tmp_path / "with"), data)
    without = make_task(**{"dataset.captions": TOKENS["dataset.captions"]}, **prompt)
    plain = validate_checkpoint(without, checkpoint, str(tmp_path / "without"), data)
    assert [Path(u).read_bytes() for u in with_tokens.base] == \
        [Path(u).read_bytes() for u in plain.base]
    assert [Path(u).read_bytes() for u in with_tokens.lora] != \
        [Path(u).read_bytes() for u in plain.lora]
