"""Shard lists as users write them: brace patterns expanded into the shard URLs, in order.

``s3://b/shards/{0000..0099}.tar`` is the webdataset spelling of a hundred shards;
``{a,b}`` lists alternatives. Both are expanded here (a few lines, rather than another
dependency), left to right, keeping a range's zero padding. The order of the expanded list
is the order samples are indexed in, so it is part of the dataset's identity.
"""

from __future__ import annotations

import re

from engine.data.errors import DatasetError

#: Most shards one task may name: a typo like ``{0..99999999}`` is refused, not expanded.
MAX_SHARDS = 100_000

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def shard_urls(patterns: list[str]) -> list[str]:
    """Every pattern expanded, in order; a shard named twice is an error (it would train
    twice as often without anyone asking for it)."""
    urls: list[str] = []
    for pattern in patterns:
        urls.extend(expand_braces(pattern))
        if len(urls) > MAX_SHARDS:
            raise DatasetError(f"dataset.shards names more than {MAX_SHARDS} shards")
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise DatasetError(f"dataset.shards names {url} twice")
        seen.add(url)
    return urls


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b`` -> a0b a1b a2b; ``{x,y}`` -> x y; ``{08..10}`` -> 08 09 10."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise DatasetError(f"unbalanced braces in shard pattern {pattern!r}")
        return [pattern]
    end = _closing(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    tails = expand_braces(tail)
    out: list[str] = []
    for middle in _alternatives(body, pattern):
        for rest in tails:
            out.append(head + middle + rest)
            if len(out) > MAX_SHARDS:
                raise DatasetError(f"shard pattern {pattern!r} names more than {MAX_SHARDS}")
    return out


def _closing(pattern: str, start: int) -> int:
    depth = 0
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            return i
    raise DatasetError(f"unbalanced braces in shard pattern {pattern!r}")


def _alternatives(body: str, pattern: str) -> list[str]:
    match = _RANGE.match(body)
    if match:
        first, last = match.group(1), match.group(2)
        a, b = int(first), int(last)
        if b < a:
            raise DatasetError(f"shard pattern {pattern!r}: range {body} runs backwards")
        if b - a >= MAX_SHARDS:
            raise DatasetError(f"shard pattern {pattern!r} names more than {MAX_SHARDS}")
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        return [str(n).zfill(width) for n in range(a, b + 1)]
    parts, depth, current = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        current += ch
    parts.append(current)
    if len(parts) == 1:
        raise DatasetError(
            f"shard pattern {pattern!r}: {{{body}}} is neither a range (0000..0099) nor a "
            "list (a,b)"
        )
    return [x for part in parts for x in expand_braces(part)]
