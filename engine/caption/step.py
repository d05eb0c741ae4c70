"""The caption step: a prepared dataset in, a captioned prepared dataset out.

Why a new prepared dataset rather than editing the old one: training's identity is the
dataset's ``content_hash`` (the records, captions included), so captions written as new
records change what trains exactly when they change, and the uncaptioned original stays
as it was (a second task with other caption settings starts from it again). The new
dataset's address is the old one's with ``-captioned-{hash}`` (hash of the old content,
the settings that decide what the backend is asked and how answers are written); its images
(and any other file, masks) are the old ones, copied. When the address already holds a
committed dataset, it is used as it is and no backend is asked: every later reader (a
segment on another worker, a retried flow) trains on the very captions the first made.

Which images are asked for (``captioning.mode``): 'missing' those without a non-empty
caption, every other mode all of them. Answers come from the cache
(:mod:`engine.caption.cache`) when it has them; the rest go to the backend in batches of
``batch_size``, each answer cached as soon as its batch returns (a crash keeps them).
An answer is cleaned (:func:`engine.caption.text.clean_caption`), refusals are told
apart (:func:`~engine.caption.text.refusal_reason`), and the caption written is
:func:`~engine.caption.text.written_caption` of it and each existing caption. An image
with no usable answer keeps its caption (perhaps empty) and is listed with the reason,
or stops the step (``on_empty: error``) once every answer is cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.caption.backend import Captioner, CaptionError, CaptionOutcome, ImageToCaption
from engine.caption.cache import CaptionCache
from engine.caption.metadata import write_metadata
from engine.caption.text import clean_caption, refusal_reason, written_caption
from engine.data.captions import has_text
from engine.data.identity import canonical_json
from engine.data.layout import (
    DATASET,
    RECORDS_NAME,
    DatasetManifest,
    PreparedDataset,
    commit_records,
    open_dataset,
    read_committed,
)
from engine.store.commit import read_verified_file
from engine.task.definition import CaptioningArgs

#: Settings that shape the written captions (beside the fingerprint, which shapes answers).
#: The settings that decide what a backend is asked (its fingerprint is made of them).
_ASKING_FIELDS = ("backend", "model", "revision", "base_url", "prompt", "trigger",
                  "class_name", "max_length")
_WRITING_FIELDS = ("mode", "strip_phrases", "lowercase", "caption_template", "trigger",
                   "class_name", "on_empty")
#: Manifest keys the commit writes itself; the rest of the old manifest is carried over.
_OWN_KEYS = frozenset({"format", "files", "manifest_sha256", "count", "content_hash",
                       "empty_captions"})
#: Most image+caption pairs a report carries (for the summary and the Prefect artifact).
MAX_PAIRS = 50
Progress = Callable[[int, int], None]


@dataclass
class CaptionReport:
    """What the step did to one prepared dataset.

    ``captioned``: images the backend was asked about now; ``from_cache``: answers found
    in the cache; ``kept``: images whose caption stayed as it was (mode 'missing');
    ``uncaptioned``: ``{"file", "reason"}`` of images left without a new caption;
    ``pairs``: ``{"file", "caption"}`` of the first :data:`MAX_PAIRS` images as written.
    """

    manifest: DatasetManifest
    source: str
    metadata: str = ""
    captioned: int = 0
    from_cache: int = 0
    kept: int = 0
    uncaptioned: list[dict[str, str]] = field(default_factory=list)
    pairs: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.manifest.address,
            "content_hash": self.manifest.content_hash,
            "source": self.source,
            "metadata": self.metadata,
            "captioned": self.captioned,
            "from_cache": self.from_cache,
            "kept": self.kept,
            "uncaptioned": [dict(u) for u in self.uncaptioned],
            "pairs": [dict(p) for p in self.pairs],
        }


def caption_dataset(manifest: DatasetManifest, args: CaptioningArgs, cache_root: str,
                    captioner: Captioner, *, progress: Progress | None = None) -> CaptionReport:
    """Caption the prepared dataset of ``manifest`` (see the module doc); the report holds
    the captioned dataset's manifest. ``progress(done, total)`` follows the backend's
    batches. ``cache_root``: the caption cache (:func:`engine.data.prepared.caption_root`)."""
    if (found := find_captioned(manifest, args)) is not None:
        return found
    dataset = open_dataset(manifest.address)
    records = [dataset.record(i) for i in range(len(dataset))]
    report = CaptionReport(manifest=manifest, source=manifest.address)
    cache = CaptionCache(cache_root, captioner.fingerprint)
    wanted = _wanted(records, args)
    address = captioned_address(manifest, args)
    answers = _answers(dataset, records, wanted, cache, captioner, args.batch_size, report,
                       progress)
    new_records = []
    for i, record in enumerate(records):
        if i not in answers:
            report.kept += 1
            new_records.append(record)
            continue
        caption, reason = _usable(answers[i], args)
        if caption is None:
            report.uncaptioned.append({"file": record["file"], "reason": str(reason)})
            new_records.append(record)
            continue
        new_records.append({**record, "captions": _written(caption, record["captions"], args)})
    if report.uncaptioned and args.on_empty == "error":
        first = report.uncaptioned[0]
        raise CaptionError(
            f"captioning: {len(report.uncaptioned)} image(s) got no caption, e.g. "
            f"{first['file']} ({first['reason']}); captioning.on_empty is 'error' (the "
            "answers are cached: set it to 'keep_uncaptioned' to train them uncaptioned)"
        )
    report.manifest, wrote = _commit(address, dataset, new_records, args, captioner, report)
    report.metadata = write_metadata(address, replace=wrote)
    report.pairs = [{"file": r["file"], "caption": r["captions"][0]}
                    for r in new_records[:MAX_PAIRS]]
    return report


def find_captioned(manifest: DatasetManifest, args: CaptioningArgs) -> CaptionReport | None:
    """The report of a dataset captioned before (by this run's caption step, an earlier run,
    another machine sharing the data folder), or None. It is used as it is and no backend
    is built or asked, so every later reader (a segment on a worker without the API key
    or the captioning model) trains on the very captions the first made, even from a
    backend whose answers vary between calls."""
    address = captioned_address(manifest, args)
    if (committed := read_committed(address)) is None:
        return None
    source = open_dataset(manifest.address)
    total = len(source)
    wanted = len(_wanted([source.record(i) for i in range(total)], args))
    report = CaptionReport(manifest=manifest, source=manifest.address)
    manifest_dict, records = committed
    report.uncaptioned = [dict(u) for u in
                          manifest_dict.get("captioning", {}).get("uncaptioned", [])]
    report.from_cache = wanted - len(report.uncaptioned)
    report.kept = total - wanted
    report.manifest = DatasetManifest.of(address, manifest_dict)
    report.metadata = write_metadata(address, replace=False)
    report.pairs = [{"file": r["file"], "caption": r["captions"][0]} for r in records[:MAX_PAIRS]]
    return report


def _wanted(records: list[dict], args: CaptioningArgs) -> list[int]:
    """The records the backend is asked about: every one, or (mode 'missing') those
    without a non-empty caption."""
    return [i for i, r in enumerate(records) if args.mode != "missing"
            or not has_text(r["captions"])]


def captioned_address(manifest: DatasetManifest, args: CaptioningArgs) -> str:
    """Where the captioned copy of ``manifest``'s dataset goes: beside it, named by what
    it is made from: the old content, what the backend is asked (the settings its
    fingerprint is made of) and how the answers are written. Known without building the
    backend, so a reader finds the dataset without its key or model."""
    asked = {name: getattr(args, name) for name in _ASKING_FIELDS}
    writing = {name: getattr(args, name) for name in _WRITING_FIELDS}
    key = {"from": manifest.content_hash, "asked": asked, "writing": writing}
    digest = hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]
    return f"{manifest.address}-captioned-{digest}"


# -- the answers ---------------------------------------------------------------------------


def _answers(dataset: PreparedDataset, records: list[dict], wanted: list[int],
             cache: CaptionCache, captioner: Captioner, size: int, report: CaptionReport,
             progress: Progress | None) -> dict[int, CaptionOutcome]:
    """Record index -> the answer for its image: cached ones, then the backend's, in
    batches, each batch cached before the next is asked (one ask per distinct image)."""
    by_sha: dict[str, CaptionOutcome] = {}
    missing: dict[str, int] = {}  # sha256 -> the first record with that image
    for i in wanted:
        sha = records[i]["sha256"]
        if sha in by_sha or sha in missing:
            continue
        cached = cache.get(sha)
        if cached is None:
            missing[sha] = i
        else:
            by_sha[sha] = cached
            report.from_cache += 1
    todo = list(missing.items())
    for start in range(0, len(todo), size):
        batch = [ImageToCaption(records[i]["file"], sha, dataset.image(i))
                 for sha, i in todo[start:start + size]]
        outcomes = captioner.caption(batch)
        if len(outcomes) != len(batch):
            raise CaptionError(f"captioner answered {len(outcomes)} times for {len(batch)} "
                               "images (a backend bug)")
        for item, outcome in zip(batch, outcomes, strict=True):
            cache.put(item.sha256, outcome)
            by_sha[item.sha256] = outcome
        report.captioned += len(batch)
        if progress is not None:
            progress(min(start + size, len(todo)), len(todo))
    return {i: by_sha[records[i]["sha256"]] for i in wanted}


def _usable(outcome: CaptionOutcome, args: CaptioningArgs) -> tuple[str | None, str | None]:
    """(cleaned caption, None) or (None, why there is none)."""
    if outcome.caption is None:
        return None, outcome.reason or "no answer"
    refused = refusal_reason(outcome.caption)
    if refused is not None:
        return None, refused
    cleaned = clean_caption(outcome.caption, args)
    if cleaned is None:
        return None, "empty after clean-up (strip_phrases)"
    return cleaned, None


def _written(caption: str, existing: list[str], args: CaptioningArgs) -> list[str]:
    """The record's new captions: one per existing caption (prepend/append), or one."""
    olds: list[str | None] = list(existing) if args.mode in ("prepend", "append") else [None]
    written = [written_caption(caption, old, args) for old in olds or [None]]
    return list(dict.fromkeys(written))


# -- the new dataset -----------------------------------------------------------------------


def _commit(address: str, dataset: PreparedDataset, records: list[dict], args: CaptioningArgs,
            captioner: Captioner, report: CaptionReport) -> tuple[DatasetManifest, bool]:
    """Commit the captioned records at ``address`` unless it holds them already; its
    manifest, and whether it was written now."""
    lines = [canonical_json(r) for r in records]
    content_hash = hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()
    existing = read_committed(address)
    if existing is not None and existing[0]["content_hash"] == content_hash:
        return DatasetManifest.of(address, existing[0]), False
    meta = {k: v for k, v in dataset.manifest.items() if k not in _OWN_KEYS}
    meta["empty_captions"] = sum(not has_text(r["captions"]) for r in records)
    meta["captioning"] = {
        "from": dataset.content_hash,
        "fingerprint": captioner.fingerprint,
        "mode": args.mode,
        "uncaptioned": report.uncaptioned,
    }
    committed = commit_records(address, lines, meta, kind=DATASET,
                               files=_CopiedFiles(dataset))
    return DatasetManifest.of(address, committed), True


class _CopiedFiles(Mapping[str, bytes]):
    """Every file of the old dataset but its records (images, masks), read and checked
    against its manifest when the commit asks for it, one at a time."""

    def __init__(self, dataset: PreparedDataset) -> None:
        self._dataset = dataset
        self._names = [n for n in dataset.manifest.files if n != RECORDS_NAME]

    def __getitem__(self, name: str) -> bytes:
        if name not in self._names:
            raise KeyError(name)
        return read_verified_file(self._dataset.address, self._dataset.manifest, name,
                                  kind=DATASET)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
