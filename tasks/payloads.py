"""What crosses a Prefect task boundary: one small typed model per payload, both sides.

Each step of the pipeline returns one of these and the flow (or the next step) takes the
same class, so a field is named, typed and documented once. They hold only addresses,
hashes, counts and short lists (see the architecture guide): Prefect hashes them for
cache keys (``RUN_SCOPED``), persists them as results, and sends :class:`SegmentRequest`
as a flow run's parameter to a segment worker, where the UI renders it as a form.

No ``from __future__ import annotations``: :class:`SegmentRequest` is the parameter of
the ``finetune-segment`` flow, and Prefect builds that flow's schema from real classes.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from engine.data.epoch_summary import SKIPPED_SHOWN, EpochSummary
from engine.task.definition import TaskDefinition
from engine.train.options import SegmentResult


class Payload(BaseModel):
    """A value passed between steps: immutable, and unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def tagged_skipped(manifests: list[Any], names: list[str]) -> list[dict[str, Any]]:
    """Every subset's skipped images, each naming its subset when there are several."""
    return [{**s, "subset": names[k]} if len(manifests) > 1 else dict(s)
            for k, m in enumerate(manifests) for s in m.skipped]


class PreparedSubset(Payload):
    """One prepared subset: its public name (never a local path), address and hash."""

    name: str
    address: str
    count: int
    content_hash: str


class DatasetSummary(Payload):
    """The prepared data of every subset: where each lives, the hash of all of them,
    what was left out, and what one epoch holds.

    ``address`` is the first subset's (the only one of a one-source task), ``count``
    and ``content_hash`` cover every subset (for one subset: its own).
    """

    address: str
    count: int
    content_hash: str
    skipped: int  # how many images were skipped (unreadable, too small, ...)
    skipped_examples: list[dict[str, Any]]  # the first SKIPPED_SHOWN of them: index, reason
    empty_captions: int
    subsets: list[PreparedSubset] = []
    epoch: EpochSummary | None = None  # buckets, subsets, uses and batches of one epoch

    @classmethod
    def of_manifest(cls, manifest: Any) -> "DatasetSummary":
        """From the engine's prepared-dataset manifest (which keeps every skipped image)."""
        return cls(
            address=manifest.address,
            count=manifest.count,
            content_hash=manifest.content_hash,
            skipped=len(manifest.skipped),
            skipped_examples=[dict(s) for s in manifest.skipped[:SKIPPED_SHOWN]],
            empty_captions=manifest.empty_captions,
        )

    @classmethod
    def of_subsets(cls, manifests: list[Any], names: list[str], content_hash: str,
                   epoch: EpochSummary | None = None) -> "DatasetSummary":
        """From every subset's manifest (in the task's order); a skipped image names its
        subset when there are several."""
        skipped = tagged_skipped(manifests, names)
        return cls(
            address=manifests[0].address,
            count=sum(m.count for m in manifests),
            content_hash=content_hash,
            skipped=len(skipped),
            skipped_examples=skipped[:SKIPPED_SHOWN],
            empty_captions=sum(m.empty_captions for m in manifests),
            subsets=[PreparedSubset(name=name, address=m.address, count=m.count,
                                    content_hash=m.content_hash)
                     for name, m in zip(names, manifests, strict=True)],
            epoch=epoch,
        )

    def counts(self) -> dict[str, Any]:
        """The part the run summary keeps: how many examples, skipped, empty captions,
        and (when known) each subset by name and what one epoch holds."""
        out = self.model_dump(
            mode="json", include={"count", "skipped", "skipped_examples", "empty_captions"}
        )
        if self.epoch is not None:  # its skipped files are the ones above
            out["epoch"] = self.model_dump(
                mode="json", include={"epoch"}, exclude={"epoch": {"skipped_examples"}}
            )["epoch"]
        if self.subsets:
            out["subsets"] = [s.model_dump(include={"name", "count", "content_hash"})
                              for s in self.subsets]
        return out


class CacheSummary(Payload):
    """The latent / caption cache of a task's data; no address when nothing is cached."""

    address: str | None
    built_now: bool  # False: a committed cache was found (a second run never re-encodes)
    dataset_hash: str


class SegmentRequest(Payload):
    """Everything one segment needs, for a task in this process or a flow run elsewhere.

    Only addresses: a segment may run on any worker that sees the same storage.
    """

    task: TaskDefinition
    index: int
    output_dir: str  # the run folder; the segment writes <output_dir>/segments/<NNNN>/
    checkpoint: str | None  # where it resumes from (None: the task's own start)
    dataset: DatasetSummary  # an input so the cache key and the UI's graph follow the data
    data_dir: str | None = None
    cache_dir: str | None = None
    budget_seconds: float | None = None
    #: train with this many processes (``loraflow segment --nproc-per-node``); None: one,
    #: in the task's own process. Left out of the dump when None, so the payload (a cache
    #: key's input, a worker's parameter) keeps the shape it had before the field.
    processes_per_segment: int | None = Field(default=None, ge=2)

    @model_serializer(mode="wrap")
    def _leave_out_one_process(self, handler: Any) -> Any:
        data = handler(self)
        if self.processes_per_segment is None and isinstance(data, dict):
            data.pop("processes_per_segment", None)
        return data


class SegmentSummary(Payload):
    """A finished segment: the engine's result, where it ran, and its mean metrics.

    Also written to the segment folder as ``result.json``, the handoff when the segment
    ran on another worker.
    """

    index: int
    output_dir: str  # the segment's own folder, <run>/segments/<NNNN>
    dataset_hash: str
    result: SegmentResult  # as the engine returned it
    # means over the segment's metrics.jsonl
    loss: float | None = None
    samples_per_second: float | None = None
    train_seconds: float = 0.0
    world_size: int = 1  # how many processes trained it (processes_per_segment)

    def row(self) -> dict[str, Any]:
        """The part worth keeping in the run summary (plain JSON values)."""
        r = self.result
        return {
            "index": self.index, "start_step": r.start_step, "global_step": r.global_step,
            "steps_done": r.steps_done, "stopped_by": r.stopped_by.value, "seconds": r.seconds,
            "loss": self.loss, "samples_per_second": self.samples_per_second,
            "checkpoint": r.checkpoint, "metrics": r.metrics, "world_size": self.world_size,
        }


class ValidationResult(Payload):
    """The validation images rendered at the final checkpoint, in order."""

    images: list[str]
    #: The same prompts and seeds rendered by the base model alone (no LoRA), in order.
    base_images: list[str] = []


class RunSummary(Payload):
    """What a run did: the publish step stores it (plus dates) as ``run_summary.json``.

    Here the places are full addresses (the flow's result prints them); the published
    copy names them relative to ``output_dir`` and leaves that out
    (engine/lora/public_summary.py).
    """

    output_dir: str
    checkpoint: str
    global_step: int
    total_steps: int
    segments: int
    dataset_hash: str
    cache: dict[str, Any]  # {"address", "built_now"}
    dataset: dict[str, Any]  # DatasetSummary.counts()
    run_name: str
    flow_run_id: str | None
    flow_run_name: str | None
    segment_results: list[dict[str, Any]]  # SegmentSummary.row() of each segment
    overrides: list[str] = []  # command-line key.path=value applied to the task file


class PublishResult(Payload):
    """The URLs the publish step wrote under ``<output_dir>/lora/`` or, for a full
    fine-tune (``training_type == "full"``: no LoRA files), ``<output_dir>/model/``."""

    lora_dir: str | None
    diffusers: str | None
    kohya: str | None
    readme: str
    task: str
    run_summary: str
    validation: list[str]
    metrics: str | None
    #: The base model's images (same prompts and seeds), copied beside the LoRA's.
    base_validation: list[str] = []
    training_type: str = "lora"
    #: A full fine-tune's model/ folder, its diffusers model folder and single file.
    model_dir: str | None = None
    diffusers_model: str | None = None
    single_file: str | None = None
    #: Further weight files by role (``diffusers_raw``, ``kohya_ema``...: EMA publish_both).
    variants: dict[str, str] = {}

    @property
    def folder(self) -> str:
        """Where it was published: ``lora/``, or ``model/`` for a full fine-tune."""
        return str(self.model_dir if self.training_type == "full" else self.lora_dir)


__all__ = [
    "SKIPPED_SHOWN", "CacheSummary", "DatasetSummary", "Payload", "PreparedSubset",
    "PublishResult", "RunSummary", "SegmentRequest", "SegmentSummary", "ValidationResult",
]
