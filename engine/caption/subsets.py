"""Captioning a task's prepared subsets: what the flow's caption step and a standalone
``loraflow segment`` / ``loraflow caption`` call between preparing and caching.

A task without ``captioning`` passes its manifests through untouched (nothing loaded,
nothing written). Webdataset shard subsets are streamed, not prepared as records, and
are passed through too (their captions are the shards'). One captioner serves every
subset, so its model is loaded once, and only if some answer is not cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.caption.backend import Captioner
from engine.caption.step import CaptionReport, Progress, caption_dataset, find_captioned
from engine.data.layout import DatasetManifest
from engine.task.definition import CaptioningArgs, TaskDefinition


@dataclass
class CaptionSummary:
    """The caption step over all subsets: one report per captioned subset (by index)."""

    reports: dict[int, CaptionReport] = field(default_factory=dict)

    @property
    def captioned(self) -> int:
        return sum(r.captioned for r in self.reports.values())

    @property
    def from_cache(self) -> int:
        return sum(r.from_cache for r in self.reports.values())

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.reports.values())

    @property
    def uncaptioned(self) -> list[dict[str, str]]:
        return [{"subset": str(i), **u} for i, r in self.reports.items() for u in r.uncaptioned]

    def to_dict(self) -> dict[str, Any]:
        return {
            "captioned": self.captioned,
            "from_cache": self.from_cache,
            "kept": self.kept,
            "uncaptioned": self.uncaptioned,
            "subsets": {str(i): r.to_dict() for i, r in self.reports.items()},
        }

    def lines(self) -> list[str]:
        """The summary for a person: counts, then why images stayed uncaptioned."""
        out = [f"captions: {self.captioned} made now, {self.from_cache} from the cache, "
               f"{self.kept} kept as they were, {len(self.uncaptioned)} uncaptioned"]
        out += [f"  uncaptioned: subset {u['subset']} {u['file']}: {u['reason']}"
                for u in self.uncaptioned]
        for i, report in self.reports.items():
            out.append(f"  subset {i}: {report.manifest.address} (captions file "
                       f"{report.metadata})")
        return out


def make_captioner(args: CaptioningArgs) -> Captioner:
    """The backend the task names (cheap: a local model's weights load on first use)."""
    if args.backend == "transformers":
        from engine.caption.local import LocalCaptioner

        return LocalCaptioner(args)
    from engine.caption.api import ApiCaptioner

    return ApiCaptioner(args)


def caption_subsets(
    task: TaskDefinition,
    manifests: list[DatasetManifest],
    cache_root: str,
    *,
    progress: Progress | None = None,
    captioner: Callable[[CaptioningArgs], Captioner] = make_captioner,
) -> tuple[list[DatasetManifest], CaptionSummary]:
    """The task's prepared subsets (``manifests``, in the task's order) captioned: the
    manifests training reads instead, and what was done. ``cache_root``: the caption
    cache (:func:`engine.data.prepared.caption_root` of the data folder, for every entry
    point). ``captioner`` builds the backend."""
    summary = CaptionSummary()
    args = task.captioning
    if args is None:
        return list(manifests), summary
    backend: Captioner | None = None  # built only if some subset is not captioned yet
    out = []
    for index, (manifest, subset) in enumerate(zip(manifests, task.subsets, strict=True)):
        if subset.shards:
            out.append(manifest)
            continue
        report = find_captioned(manifest, args)
        if report is None:
            backend = backend or captioner(args)
            report = caption_dataset(manifest, args, cache_root, backend, progress=progress)
        summary.reports[index] = report
        out.append(report.manifest)
    return out, summary
