"""What caption one use of an example trains with, under its subset's caption rules.

The order is the schema's (:class:`engine.task.definition.CaptionArgs`): pick one of the
example's captions, shuffle its tags (the first ``keep_tokens`` stay), drop it with
probability ``dropout``, then add the prefix and suffix. A dropped caption stays empty,
prefix and suffix included: that empty caption is the unconditional case classifier-free
guidance learns from.

Every choice has its own generator keyed by (seed, epoch, draw), so the caption of a use
does not depend on batch, segment or worker. With the default rules the only draw is the
pick, with the very generator samples always used, so such training keeps its bits.
"""

from __future__ import annotations

import torch

from engine.task.definition import CaptionArgs
from engine.train.seeding import generator


def caption_for(captions: list[str], rules: CaptionArgs, seed: int, epoch: int,
                draw: int) -> str:
    """The caption of use ``draw`` of an example in ``epoch`` (see the module docstring)."""
    captions = captions or [""]
    pick = 0
    if len(captions) > 1:
        g = generator(seed, "caption", epoch, draw)
        pick = int(torch.randint(len(captions), (1,), generator=g))
    text = captions[pick]
    if rules.shuffle_tags:
        text = shuffle_tags(text, rules, generator(seed, "tag_shuffle", epoch, draw))
    if rules.dropout > 0:
        g = generator(seed, "caption_dropout", epoch, draw)
        if float(torch.rand(1, generator=g)) < rules.dropout:
            return ""
    return _framed(text, rules)


def shuffle_tags(text: str, rules: CaptionArgs, g: torch.Generator) -> str:
    """``text``'s tags in a drawn order, the first ``keep_tokens`` in place.

    Tags are split on ``tag_separator`` and stripped; empty ones (a trailing comma) are
    dropped; the result is joined with the separator and one space.
    """
    tags = [t.strip() for t in text.split(rules.tag_separator)]
    tags = [t for t in tags if t]
    kept, rest = tags[: rules.keep_tokens], tags[rules.keep_tokens :]
    if len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]
    return (rules.tag_separator + " ").join(kept + rest)


def caption_variants(captions: list[str], rules: CaptionArgs) -> list[str] | None:
    """Every caption a use of this example can train with, each once, in a fixed order;
    ``None`` when tags are shuffled (too many orders to list: encode live instead).

    With dropout the empty caption is among them. A cache that encodes these has every
    caption :func:`caption_for` can return.
    """
    if rules.shuffle_tags:
        return None
    out = [_framed(c, rules) for c in (captions or [""])]
    if rules.dropout > 0:
        out.append("")
    return list(dict.fromkeys(out))


def _framed(text: str, rules: CaptionArgs) -> str:
    return (rules.prefix or "") + text + (rules.suffix or "")
