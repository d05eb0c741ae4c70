"""The run summary as published (``run_summary.json``): places named relative to the run.

The summary the flow builds names where things are on this machine (the run folder, each
segment's checkpoint and metrics, the latent cache), because the steps of a run need
them. A published folder travels on its own (Hub, Civitai, a shared drive), and a local
path in it tells strangers a user's home, a worker's scratch folder or a bucket's layout,
and makes the same training give different bytes on two machines. So the published copy:

* leaves out ``output_dir`` (the run folder itself: the reader has it in hand);
* writes every place inside the run folder relative to it
  (``segments/0001/checkpoint``, ``segments/0001/metrics/metrics.jsonl``), the run
  folder being the one above ``lora/`` (or ``model/``);
* names a place outside it (a cache shared between runs) by its last part only;
* shows a ``key.path=value`` override of a location field (``dataset.name=/home/...``)
  by :func:`~engine.lora.metadata.public_name`, as ``task.json`` shows the field;
* and, last, redacts every string (:func:`~engine.store.redact.redact_values`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine.lora.metadata import public_name
from engine.store.redact import redact_values

#: Task fields that hold a location (the last part of an override's key).
LOCATION_FIELDS = frozenset({
    "name", "url", "shards", "checkpoint", "vae", "unet", "text_encoder", "text_encoder_2",
    "tokenizer", "tokenizer_2", "prompts_file", "dataset_file", "class_data_dir", "model",
    "base_url",
})
_DROPPED = ("output_dir",)


def public_run_summary(summary: Mapping[str, Any], output_url: str) -> dict[str, Any]:
    """``summary`` as ``run_summary.json`` holds it: see the module docstring."""
    data = {k: v for k, v in summary.items() if k not in _DROPPED}
    data = _relative_inside(data, output_url)
    cache = data.get("cache")
    if isinstance(cache, Mapping) and isinstance(cache.get("address"), str):
        data["cache"] = {**cache, "address": relative_location(cache["address"], output_url)}
    if isinstance(data.get("overrides"), list):
        data["overrides"] = [public_override(str(text)) for text in data["overrides"]]
    return redact_values(data)


def relative_location(location: str, output_url: str) -> str:
    """``location`` relative to the run folder ``output_url`` (``.`` for the folder
    itself); a place outside it by its last part only."""
    inside = _inside(location, output_url)
    if inside is not None:
        return inside
    return public_name(location).rstrip("/").rsplit("/", 1)[-1] or public_name(location)


def public_override(text: str) -> str:
    """A ``key.path=value`` override with a location value shown by its public name."""
    key, sep, value = text.partition("=")
    if not sep or key.rsplit(".", 1)[-1] not in LOCATION_FIELDS:
        return text
    try:
        parsed = json.loads(value)
    except ValueError:
        return f"{key}={public_name(value)}"
    if isinstance(parsed, str):
        return f"{key}={json.dumps(public_name(parsed))}"
    if isinstance(parsed, list):
        shown = [public_name(v) if isinstance(v, str) else v for v in parsed]
        return f"{key}={json.dumps(shown)}"
    return text


def _relative_inside(value: Any, output_url: str) -> Any:
    """Every string of ``value`` that names a place inside the run folder, relative."""
    if isinstance(value, str):
        inside = _inside(value, output_url)
        return value if inside is None else inside
    if isinstance(value, Mapping):
        return {k: _relative_inside(v, output_url) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative_inside(v, output_url) for v in value]
    return value


def _inside(location: str, output_url: str) -> str | None:
    """The part of ``location`` below ``output_url`` (either may be ``file://``), or None."""
    root = _plain(output_url).rstrip("/")
    place = _plain(location)
    if not root:
        return None
    if place.rstrip("/") == root:
        return "."
    if place.startswith(root + "/"):
        return place[len(root) + 1:].rstrip("/") or "."
    return None


def _plain(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


__all__ = ["LOCATION_FIELDS", "public_override", "public_run_summary", "relative_location"]
