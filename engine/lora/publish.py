"""Publish a finished training: the LoRA files users load, with their card, under ``lora/``.

From the last committed checkpoint's ``pytorch_lora_weights.safetensors`` this writes
``<output>/lora/``:

* ``pytorch_lora_weights.safetensors``: the diffusers file, tensors and diffusers' own
  ``lora_adapter_metadata`` unchanged (diffusers needs it to load alpha != rank at the
  right strength), plus the kohya / model-spec / hash keys;
* ``loraflow_<slug>.safetensors``: the kohya file for ComfyUI and A1111, true alpha;
* ``README.md`` (model card), ``task.json`` (validated task, URLs without secrets,
  local paths by their last part), ``run_summary.json`` (places relative to the run),
  ``validation/*.png`` and the metrics file when given, and ``validation/base/*.png``
  (the base model alone, same prompts and seeds) when given. No published file holds a
  local path, a temporary folder or a credential.

With ``train_args.ema`` the weights files hold the chosen weights (the average by
default, from the checkpoint's ``pytorch_lora_weights_ema.safetensors``), and with
``publish_both`` the other ones as well, in files named with ``_raw`` / ``_ema``; each
file's metadata says which (``loraflow_weights``) and the card has a section on it.

Publishing is a pure function of its inputs (dates come from the run summary, never
from the clock), so running it again after a crash rewrites the same bytes.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

from safetensors.torch import load as load_tensors

from engine.lora.card import CardFiles, render_model_card
from engine.lora.embeddings import (
    bundle_new_tokens,
    new_tokens_section,
    write_embedding_files,
)
from engine.lora.formats import alphas_from_adapter_metadata, diffusers_to_kohya
from engine.lora.lycoris import module_weights, needs_base_weights, peft_to_lycoris
from engine.lora.metadata import (
    LoraFacts,
    epoch_of,
    lora_metadata,
    public_name,
    public_task_dict,
    read_metadata,
    write_lora_file,
)
from engine.lora.public_summary import public_run_summary
from engine.lora.weights import LORA_FILE
from engine.model.family import Family
from engine.store import storage
from engine.store.commit import read_checkpoint
from engine.store.safetensors_io import with_metadata
from engine.task.definition import TaskDefinition
from engine.train.ema import other_source, published_source

LORA_DIR = "lora"
KOHYA_PREFIX = "loraflow_"


def slug(text: str, max_length: int = 64) -> str:
    """A file-name-safe lowercase slug ("My run/v2" -> "my_run_v2"); "lora" if empty."""
    cleaned = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return cleaned[:max_length].strip("_") or "lora"


def kohya_file_name(task: TaskDefinition, run_summary: Mapping[str, Any]) -> str:
    """``loraflow_<run name or model name>.safetensors``: the name A1111 prompts use."""
    name = run_summary.get("run_name") or task.model.name.rsplit("/", 1)[-1]
    return f"{KOHYA_PREFIX}{slug(str(name))}.safetensors"


def publish_lora(
    checkpoint_url: str,
    task: TaskDefinition,
    output_url: str,
    *,
    dataset_hash: str,
    captions: list[str],
    validation_images: list[str],
    metrics_url: str | None,
    run_summary: dict,
    family: Family | None = None,
    base_images: list[str] | None = None,
) -> dict[str, Any]:
    """Write ``output_url``/lora/ from the committed checkpoint; return the URLs written.

    ``run_summary`` is stored as ``run_summary.json`` (places in the run folder relative
    to it, no local path: engine/lora/public_summary.py); its ``run_name`` names the kohya
    file and the card, its ``started_at``/``finished_at`` (ISO-8601 or unix seconds)
    date the files. ``family`` is read from the model's configs when not given.
    ``base_images`` (same prompts and seeds as ``validation_images``, without the LoRA)
    put a base-vs-LoRA table on the card.
    """
    loaded = read_checkpoint(checkpoint_url)
    source = loaded.files[published_source(task)]
    family = family or _model_family(task)
    facts = LoraFacts(
        task=task,
        family=family,
        title=str(run_summary.get("run_name")
                  or f"loraflow LoRA for {public_name(task.model.name)}"),
        steps=loaded.global_step,
        dataset_hash=dataset_hash,
        started_at=run_summary.get("started_at"),
        finished_at=run_summary.get("finished_at"),
        epoch=epoch_of(run_summary),
    )
    lora_dir = storage.join(output_url, LORA_DIR)
    weights = _weight_files(source, facts, kohya_file_name(task, run_summary))
    weights, roles = _ema_weight_files(task, weights, loaded.files, facts,
                                       kohya_file_name(task, run_summary))
    weights = bundle_new_tokens(task, family, weights, roles, loaded.files)  # lora.new_tokens
    _remove_stale_weights(lora_dir, keep=set(weights))
    published: dict[str, Any] = {"lora_dir": lora_dir, "diffusers": None, "kohya": None}
    for name, data in weights.items():
        url = storage.join(lora_dir, name)
        storage.write_bytes(url, data)
        published[roles[name]] = url
    embeddings = write_embedding_files(task, family, loaded.files, lora_dir)  # {token: URL}
    published |= {f"embedding:{token}": url for token, url in embeddings.items()}

    images = _copy_validation_images(validation_images, lora_dir)
    base = _copy_validation_images(base_images or [], lora_dir, "validation/base")
    metrics_name = _copy_metrics(metrics_url, lora_dir)
    card_files = CardFiles(
        diffusers=LORA_FILE if LORA_FILE in weights else None,
        kohya=next((n for n in weights if n != LORA_FILE), None),
        validation_images=[f"validation/{storage.basename(u)}" for u in images],
        metrics=metrics_name,
        base_images=[f"validation/base/{storage.basename(u)}" for u in base],
        prompts=[_png_prompt(storage.read_bytes(u)) for u in images] if base else [],
    )
    texts = {
        "task.json": _json_text(public_task_dict(task)),
        "run_summary.json": _json_text(public_run_summary(run_summary, output_url)),
        "README.md": render_model_card(facts, card_files, captions) + _ema_section(task, roles)
        + new_tokens_section(task, embeddings),
    }
    for name, text in texts.items():
        storage.write_bytes(storage.join(lora_dir, name), text.encode("utf-8"))
    published.update(
        readme=storage.join(lora_dir, "README.md"),
        task=storage.join(lora_dir, "task.json"),
        run_summary=storage.join(lora_dir, "run_summary.json"),
        validation=images,
        base_validation=base,
        metrics=storage.join(lora_dir, metrics_name) if metrics_name else None,
    )
    return published


# -- the weight files -----------------------------------------------------------------


def _weight_files(source: bytes, facts: LoraFacts, kohya_name: str) -> dict[str, bytes]:
    """{file name: bytes} for each format in ``task.output.lora_formats``."""
    tensors = load_tensors(source)
    source_meta = read_metadata(source)
    files: dict[str, bytes] = {}
    for fmt in _formats(facts.task):
        if fmt == "diffusers":
            meta = {**source_meta, **lora_metadata(facts, "diffusers")}
            files[LORA_FILE] = write_lora_file(tensors, meta)
        elif _plain_lora(facts.task):
            alphas = _alphas(facts.task, source_meta)
            kohya = diffusers_to_kohya(tensors, facts.family.name, alphas)
            files[kohya_name] = write_lora_file(kohya, lora_metadata(facts, "kohya"))
        else:
            base = _base_weights(facts.task, tensors) if needs_base_weights(tensors) else None
            kohya = peft_to_lycoris(tensors, facts.family.name, source_meta, base)
            files[kohya_name] = write_lora_file(kohya, lora_metadata(facts, "kohya"))
    return files


def _formats(task: TaskDefinition) -> list[str]:
    """The formats asked for; LoHa and LoKr only as the LyCORIS (kohya) file, which is
    the one that loads anywhere (diffusers' ``load_lora_weights`` reads neither)."""
    formats = list(dict.fromkeys(task.output.lora_formats))
    if task.lora.type in ("loha", "lokr"):
        return ["kohya"]
    return formats


def _plain_lora(task: TaskDefinition) -> bool:
    """A LoRA without the adapter-type fields: written by the original converter."""
    return task.lora.type == "lora" and task.lora.conv is None


def _base_weights(task: TaskDefinition, tensors: Mapping[str, Any]) -> Any:
    """The frozen weights a DoRA's ``dora_scale`` is written against (see lycoris)."""
    import torch

    from engine.model.loading import load_base_model

    with_text = any(not k.startswith("unet.") for k in tensors)
    base = load_base_model(task, torch.device("cpu"), with_vae=False, with_text=with_text)
    modules: dict[str, Any] = {"unet": base.unet}
    for i, encoder in enumerate(base.text_encoders):
        modules["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
    return module_weights(modules)


def _ema_weight_files(task: TaskDefinition, weights: dict[str, bytes],
                      checkpoint: Mapping[str, bytes], facts: LoraFacts, kohya_name: str
                      ) -> tuple[dict[str, bytes], dict[str, str]]:
    """The weight files labelled ``ema``/``raw`` (with train_args.ema), plus the other
    weights' files when both are published; and each file's role (``diffusers``,
    ``kohya``, ``diffusers_raw``, ...: the key of the URLs :func:`publish_lora` returns)."""
    roles = {name: "diffusers" if name == LORA_FILE else "kohya" for name in weights}
    label = _weights_label(task, main=True)
    if label is None:
        return weights, roles
    out = {name: _labelled(data, label) for name, data in weights.items()}
    other = other_source(task)
    if other is not None:
        file, suffix = other
        more = _weight_files(checkpoint[file], facts, kohya_name)
        for name, data in more.items():
            marked = name.removesuffix(".safetensors") + f"{suffix}.safetensors"
            out[marked] = _labelled(data, suffix.lstrip("_"))
            roles[marked] = roles[name] + suffix
    return out, roles


def _labelled(data: bytes, label: str) -> bytes:
    """The file with ``loraflow_weights`` (``ema`` or ``raw``) in its metadata."""
    return with_metadata(data, {**read_metadata(data), "loraflow_weights": label})


def _weights_label(task: TaskDefinition, *, main: bool) -> str | None:
    """``ema`` or ``raw`` for the main (or the other) files; None without an EMA."""
    ema = task.train_args.ema
    if ema is None:
        return None
    return ema.publish if main else ("raw" if ema.publish == "ema" else "ema")


def _ema_section(task: TaskDefinition, roles: Mapping[str, str]) -> str:
    """The card's words on which file holds the average and which the raw weights."""
    ema = task.train_args.ema
    if ema is None:
        return ""
    words = {
        "ema": f"the exponential moving average of the trained weights (decay {ema.decay}, "
               f"from step {ema.start_step}, updated every {ema.update_every} step(s))",
        "raw": "the raw weights, as the optimizer left them after the last step",
    }
    main = str(_weights_label(task, main=True))
    other = str(_weights_label(task, main=False))
    lines = ["", "## Weights: EMA or raw", ""]
    for name in sorted(roles):
        plain = roles[name] in ("diffusers", "kohya")
        lines.append(f"- `{name}`: {words[main if plain else other]}.")
    lines += ["", f"The files without a suffix hold the {main} weights; `loraflow_weights` "
                  "in each file's metadata says the same.", ""]
    return "\n".join(lines)


def _alphas(task: TaskDefinition, source_meta: Mapping[str, str]) -> dict[str, float]:
    """Per-component alpha: the file's adapter config (what diffusers loads), else the task's."""
    alphas = dict.fromkeys(("unet", "text_encoder", "text_encoder_2"), task.lora_alpha)
    alphas.update(alphas_from_adapter_metadata(source_meta))
    return alphas


def _remove_stale_weights(lora_dir: str, keep: set[str]) -> None:
    """Drop weight files of formats no longer asked for, so the folder matches the task."""
    for name in storage.list_files(lora_dir):
        if "/" not in name and name.endswith(".safetensors") and name not in keep:
            storage.remove(storage.join(lora_dir, name))


# -- the other files ------------------------------------------------------------------


def _copy_validation_images(urls: list[str], lora_dir: str,
                            folder: str = "validation") -> list[str]:
    """Copy the PNGs to lora/<folder>/ (names kept, de-duplicated); return new URLs."""
    copied = []
    used: set[str] = set()
    for i, url in enumerate(urls):
        name = storage.basename(url)
        if name in used:
            name = f"{i:02d}_{name}"
        used.add(name)
        target = storage.join(lora_dir, folder, name)
        storage.write_bytes(target, storage.read_bytes(url))
        copied.append(target)
    return copied


def _png_prompt(data: bytes) -> str:
    """The prompt a validation PNG was drawn from (first line of its parameters text)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return str(image.text.get("parameters", "")).split("\n", 1)[0]


def _copy_metrics(metrics_url: str | None, lora_dir: str) -> str | None:
    if not metrics_url:
        return None
    name = storage.basename(metrics_url)
    storage.write_bytes(storage.join(lora_dir, name), storage.read_bytes(metrics_url))
    return name


def _model_family(task: TaskDefinition) -> Family:
    from engine.model.loading import inspect_model

    return inspect_model(task.model)[1]


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
