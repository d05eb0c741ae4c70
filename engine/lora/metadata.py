"""The safetensors header ``__metadata__`` of a published LoRA file.

Tools show what a LoRA is from its header, never from a side file: kohya's ``ss_*`` keys
(A1111, Civitai, the additional-networks extension), Stability's ``modelspec.*`` keys
(ComfyUI, SwarmUI, InvokeAI) and ``sshs_model_hash``, the sha256 of the tensor data that
A1111/Civitai use to identify a file. Values are all strings (the safetensors format
allows nothing else). Everything here is derived from the task and the run, never from
the clock, so publishing the same checkpoint twice writes the same bytes.

``modelspec.implementation`` names the codebase whose key names the file uses: the
diffusers file says ``https://github.com/huggingface/diffusers`` (PEFT keys), the kohya
file ``https://github.com/kohya-ss/sd-scripts`` (its ``networks.lora`` key scheme, which
ComfyUI and A1111 read). The spec only asks that the string be stable per format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save

from engine.data.epoch_summary import EpochSummary
from engine.model.family import Family
from engine.store.redact import public_url
from engine.store.safetensors_io import read_metadata as read_metadata  # re-export for callers
from engine.store.safetensors_io import tensor_data_hash, with_metadata
from engine.task.definition import DatasetArgs, TaskDefinition

FileFormat = Literal["diffusers", "kohya"]

IMPLEMENTATIONS: dict[str, str] = {
    "diffusers": "https://github.com/huggingface/diffusers",
    "kohya": "https://github.com/kohya-ss/sd-scripts",
}
MODELSPEC_VERSION = "1.0.0"
HASH_KEY = "sshs_model_hash"
MODELSPEC_HASH_KEY = "modelspec.hash_sha256"


@dataclass(frozen=True)
class LoraFacts:
    """What the header says about a trained LoRA; all of it fixed once training ends."""

    task: TaskDefinition
    family: Family
    title: str
    steps: int
    dataset_hash: str
    started_at: str | float | None = None  # ISO-8601 text or unix seconds
    finished_at: str | float | None = None
    #: What an epoch trained (subsets, buckets, uses): kohya's dataset keys, when known.
    epoch: EpochSummary | None = None

    @property
    def prediction_type(self) -> str:
        return self.task.train_args.prediction_type or self.family.default_prediction_type


# -- the task, without secrets --------------------------------------------------------


def public_name(location: str) -> str:
    """How a published file may name a model, dataset or checkpoint location.

    A Hub id or an embedded ``loraflow/...`` id is kept. A URL keeps scheme, host and path,
    without credentials. A local path (absolute, ``~``/``.``-relative, ``file://``, or an
    existing folder) keeps only its last part: a user's home or a worker's scratch folder
    must not travel inside a shared LoRA file, and the same training on two machines must
    give the same bytes.
    """
    if location.startswith("file://"):
        location = location[len("file://"):]
    elif "://" in location:
        return public_url(location)
    path = Path(location).expanduser()
    if path.is_absolute() or location.startswith((".", "~")) or path.exists():
        return path.name or location
    return location


def public_task_dict(task: TaskDefinition) -> dict[str, Any]:
    """The validated task as plain JSON data, safe to publish: see :func:`public_name`.

    A task names its dataset (and possibly a checkpoint) by URL; a presigned or
    ``user:pass@`` URL would leak access if it travelled inside a shared LoRA file, and a
    local path would leak the machine's layout. Every field that may hold a location is
    shown so: the model and its component overrides, each subset's source and shards, the
    checkpoint, and the sections' files (:data:`_SECTION_LOCATIONS`).
    """
    data = task.stable_dump(mode="json")
    for key in ("name", "vae", "unet", "text_encoder", "text_encoder_2", "tokenizer",
                "tokenizer_2"):
        if data["model"].get(key):
            data["model"][key] = public_name(data["model"][key])
    if data.get("dataset") is None:  # several subsets: a task document names only those
        data.pop("dataset", None)
    for subset in [data["dataset"]] if "dataset" in data else data["datasets"]:
        for key in ("url", "name"):
            if subset.get(key):
                subset[key] = public_name(subset[key])
        if subset.get("shards"):
            subset["shards"] = [public_name(shard) for shard in subset["shards"]]
    if data.get("checkpoint"):
        data["checkpoint"] = public_name(data["checkpoint"])
    for section, key in _SECTION_LOCATIONS:
        part = data.get(section)
        if isinstance(part, dict) and part.get(key):
            part[key] = public_name(part[key])
    return data


#: Location fields outside ``model``/``dataset``: a validation prompts or data file, the
#: DreamBooth class images folder, a local captioning model and the captioning API's URL.
_SECTION_LOCATIONS = (
    ("validation", "prompts_file"), ("validation", "dataset_file"),
    ("dreambooth", "class_data_dir"), ("captioning", "model"), ("captioning", "base_url"),
)


def subset_name(args: DatasetArgs) -> str:
    """How published files and summaries name one subset: its source's public name
    (the first shard pattern, with how many more, for a shard set)."""
    if args.shards:
        more = f" (+{len(args.shards) - 1} more)" if len(args.shards) > 1 else ""
        return public_name(args.shards[0]) + more
    return public_name(args.name or args.url or "")


def subset_names(task: TaskDefinition) -> list[str]:
    """:func:`subset_name` of each subset, in order."""
    return [subset_name(args) for args in task.subsets]


def task_json(task: TaskDefinition) -> str:
    """Compact, key-sorted JSON of :func:`public_task_dict` (stable bytes)."""
    return json.dumps(public_task_dict(task), sort_keys=True, separators=(",", ":"))


# -- the keys -------------------------------------------------------------------------


def kohya_metadata(facts: LoraFacts) -> dict[str, str]:
    """kohya sd-scripts' training keys, as A1111 and Civitai display them."""
    task, train = facts.task, facts.task.train_args
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(task.lora.rank),
        "ss_network_alpha": _number(task.lora_alpha),
        "ss_base_model_version": facts.family.kohya_base_model_version,
        "ss_v2": str(facts.family.name == "sd2"),
        "ss_sd_model_name": public_name(task.model.name),
        "ss_resolution": f"({train.resolution}, {train.resolution})",
        "ss_steps": str(facts.steps),
        "ss_max_train_steps": str(facts.steps),
        "ss_learning_rate": _number(train.learning_rate),
        "ss_lr_scheduler": train.lr_scheduler.lr_scheduler,
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_mixed_precision": task.mixed_precision,
        "ss_seed": str(task.seed),
        "ss_noise_offset": _number(train.noise_offset),
        "ss_dataset_hash": facts.dataset_hash,
    }
    meta.update(network_metadata(task))
    if train.snr_gamma is not None:
        meta["ss_min_snr_gamma"] = _number(train.snr_gamma)
    if facts.epoch is not None:
        meta.update(kohya_dataset_metadata(facts.epoch, bucketed=is_bucketed(task)))
    if facts.started_at is not None:
        meta["ss_training_started_at"] = _unix_seconds(facts.started_at)
    if facts.finished_at is not None:
        meta["ss_training_finished_at"] = _unix_seconds(facts.finished_at)
    return meta


def network_metadata(task: TaskDefinition) -> dict[str, str]:
    """The network module and its args, as the loaders and Civitai read them.

    A plain LoRA says nothing more than ``networks.lora`` (kohya's own); LoCon adds
    kohya's ``conv_dim`` / ``conv_alpha`` args. LoHa, LoKr and DoRA are LyCORIS networks:
    ``ss_network_module`` ``lycoris.kohya`` and ``ss_network_args`` naming the ``algo``
    (DoRA is LyCORIS's ``lora`` with ``dora_wd``), as LyCORIS' kohya wrapper writes them.
    Empty for a task without the adapter fields, so its header keeps its bytes.
    """
    lora = task.lora
    args: dict[str, str] = {}
    if lora.type != "lora":
        args["algo"] = {"loha": "loha", "lokr": "lokr", "dora": "lora"}[lora.type]
    if lora.type == "dora":
        args["dora_wd"] = "True"
    if lora.type == "lokr":
        args["factor"] = str(lora.lokr_factor)
    if lora.conv is not None:
        conv_alpha = lora.conv.alpha if lora.conv.alpha is not None else float(lora.conv.rank)
        args.update(conv_dim=str(lora.conv.rank), conv_alpha=_number(conv_alpha))
    if not args:
        return {}
    module = "networks.lora" if lora.type == "lora" else "lycoris.kohya"
    return {"ss_network_module": module, "ss_network_args": json.dumps(args, sort_keys=True)}


def kohya_dataset_metadata(epoch: EpochSummary, *, bucketed: bool) -> dict[str, str]:
    """kohya's keys for what was trained on: each subset (by public name) with its
    repeats and images, the uses per epoch, and the buckets when bucketing was on."""
    dirs = {s.name: {"n_repeats": s.repeats, "img_count": s.images} for s in epoch.subsets}
    meta = {
        "ss_dataset_dirs": json.dumps(dirs, sort_keys=True),
        "ss_num_train_images": str(epoch.images_per_epoch),
        "ss_enable_bucket": str(bucketed),
    }
    if bucketed:
        buckets = {
            str(i): {"resolution": [int(n) for n in b.bucket.split("x")], "count": b.uses}
            for i, b in enumerate(epoch.buckets)
        }
        meta["ss_bucket_info"] = json.dumps({"buckets": buckets}, sort_keys=True)
    return meta


def is_bucketed(task: TaskDefinition) -> bool:
    """Whether the task turns aspect-ratio buckets on (for all or some subsets)."""
    return task.train_args.buckets is not None or any(s.buckets is not None
                                                      for s in task.subsets)


def epoch_of(run_summary: Mapping[str, Any]) -> EpochSummary | None:
    """The epoch summary a run summary carries (``dataset.epoch``), if any."""
    from pydantic import TypeAdapter

    found = (run_summary.get("dataset") or {}).get("epoch")
    return None if found is None else TypeAdapter(EpochSummary).validate_python(found)


def modelspec_metadata(facts: LoraFacts, file_format: FileFormat) -> dict[str, str]:
    """Stability's model-spec keys (architecture, implementation, title, ...)."""
    size = facts.task.train_args.resolution
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": facts.family.modelspec_architecture,
        "modelspec.implementation": IMPLEMENTATIONS[file_format],
        "modelspec.title": facts.title,
        "modelspec.resolution": f"{size}x{size}",
        # the spec's values are "v" and "epsilon"
        "modelspec.prediction_type": "v" if facts.prediction_type == "v_prediction" else "epsilon",
    }
    when = facts.finished_at if facts.finished_at is not None else facts.started_at
    if when is not None:
        meta["modelspec.date"] = _iso_date(when)
    return meta


def lora_metadata(facts: LoraFacts, file_format: FileFormat) -> dict[str, str]:
    """The header of one published file: kohya + modelspec keys + the task (no hash yet)."""
    return {
        **kohya_metadata(facts),
        **modelspec_metadata(facts, file_format),
        "loraflow_task": task_json(facts.task),
    }


# -- hashing and writing --------------------------------------------------------------


def write_lora_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` with ``metadata`` plus the data hash keys.

    safetensors lays out the tensor data itself (ordered by dtype and name), then the
    header is rewritten with sorted keys: the library writes its metadata map in hash
    order, which differs between runs, and a republished file must be the same bytes.
    The hash covers the data only, so it is computed first and then put in the header.
    """
    plain = {k: str(v) for k, v in metadata.items() if k not in (HASH_KEY, MODELSPEC_HASH_KEY)}
    serialised = save(dict(tensors), metadata=plain)
    digest = tensor_data_hash(serialised)
    hashes = {HASH_KEY: digest, MODELSPEC_HASH_KEY: f"0x{digest}"}
    return with_metadata(serialised, {**plain, **hashes})


# -- formatting -----------------------------------------------------------------------


def _number(value: float) -> str:
    """2.0 -> "2.0", 0.0001 -> "0.0001": Python's shortest round-trip text."""
    return repr(float(value))


def _as_datetime(value: str | float) -> datetime:
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _unix_seconds(value: str | float) -> str:
    """kohya writes these as unix seconds (``str(time.time())``); so do we."""
    return repr(_as_datetime(value).timestamp())


def _iso_date(value: str | float) -> str:
    return _as_datetime(value).date().isoformat()
