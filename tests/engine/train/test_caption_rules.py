"""Caption rules: the pick keeps today's bits, tags shuffle with keep_tokens in place,
dropout empties the whole caption, and caption_variants lists every possible result."""

from __future__ import annotations

import torch

from engine.task.definition import CaptionArgs
from engine.train.caption_rules import caption_for, caption_variants
from engine.train.seeding import generator

CAPTIONS = ["a red fox", "a fox in snow", "fox, animal"]


def _legacy_pick(captions: list[str], seed: int, epoch: int, key: int) -> str:
    """How samples.decide picked a caption before caption rules existed."""
    g = generator(seed, "caption", epoch, key)
    return captions[int(torch.randint(len(captions), (1,), generator=g))]


def test_default_rules_pick_the_caption_samples_always_picked():
    rules = CaptionArgs()
    for epoch in range(3):
        for draw in range(20):
            got = caption_for(CAPTIONS, rules, 7, epoch, draw)
            assert got == _legacy_pick(CAPTIONS, 7, epoch, draw)


def test_one_caption_or_none_needs_no_draw():
    assert caption_for(["only"], CaptionArgs(), 1, 0, 0) == "only"
    assert caption_for([], CaptionArgs(), 1, 0, 0) == ""


def test_prefix_and_suffix_are_added_as_written():
    rules = CaptionArgs(prefix="sks, ", suffix=" (photo)")
    assert caption_for(["a dog"], rules, 0, 0, 0) == "sks, a dog (photo)"


def test_tag_shuffle_keeps_the_leading_tags_and_every_tag():
    rules = CaptionArgs(shuffle_tags=True, keep_tokens=2)
    text = "sks,  person , smiling,outdoors, hat, red scarf,"
    seen = set()
    for draw in range(40):
        got = caption_for([text], rules, 3, 0, draw)
        tags = got.split(", ")
        assert tags[:2] == ["sks", "person"]
        assert sorted(tags[2:]) == sorted(["smiling", "outdoors", "hat", "red scarf"])
        seen.add(got)
    assert len(seen) > 5  # the order really is drawn


def test_tag_shuffle_uses_the_given_separator():
    rules = CaptionArgs(shuffle_tags=True, tag_separator="|")
    got = caption_for(["a|b|c"], rules, 0, 0, 0)
    assert sorted(got.split("| ")) == ["a", "b", "c"]


def test_draws_are_a_function_of_seed_epoch_and_draw():
    rules = CaptionArgs(shuffle_tags=True, dropout=0.3, prefix="p ")
    first = [caption_for(CAPTIONS, rules, 5, e, d) for e in range(2) for d in range(30)]
    again = [caption_for(CAPTIONS, rules, 5, e, d) for e in range(2) for d in range(30)]
    other_seed = [caption_for(CAPTIONS, rules, 6, e, d) for e in range(2) for d in range(30)]
    assert first == again
    assert first != other_seed


def test_dropout_empties_the_caption_prefix_included_at_about_its_rate():
    rules = CaptionArgs(dropout=0.25, prefix="sks ", suffix="!")
    got = [caption_for(["a cat"], rules, 11, 0, d) for d in range(2000)]
    dropped = got.count("")
    assert 400 < dropped < 600
    assert set(got) == {"", "sks a cat!"}


def test_dropout_one_always_drops_and_zero_never():
    assert caption_for(["x"], CaptionArgs(dropout=1.0, prefix="p"), 0, 0, 0) == ""
    assert all(caption_for(["x"], CaptionArgs(dropout=0.0), 0, 0, d) == "x" for d in range(50))


def test_variants_hold_every_caption_a_use_can_get():
    rules = CaptionArgs(dropout=0.5, prefix="sks, ")
    variants = caption_variants(CAPTIONS, rules)
    produced = {caption_for(CAPTIONS, rules, 2, e, d) for e in range(3) for d in range(100)}
    assert produced == set(variants)
    assert len(variants) == len(set(variants))
    assert "" in variants


def test_variants_without_dropout_are_the_framed_captions():
    assert caption_variants(["a", "b", "a"], CaptionArgs(suffix=".")) == ["a.", "b."]
    assert caption_variants([], CaptionArgs()) == [""]


def test_variants_are_none_when_tags_shuffle():
    assert caption_variants(CAPTIONS, CaptionArgs(shuffle_tags=True)) is None
