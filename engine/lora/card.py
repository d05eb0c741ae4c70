"""The README.md published beside the LoRA files: what it is and how to load it.

A LoRA folder is passed around on its own (Hub, Civitai, a shared drive); the card is the
only place that says which base model it needs, what prompts it was trained on and how
each tool loads it. Its text depends only on its inputs, so republishing the same
checkpoint rewrites the same bytes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from engine.lora.metadata import LoraFacts, is_bucketed, public_name
from engine.lora.weights import LORA_FILE

CAPTION_SAMPLE = 5
TOP_WORDS = 12
_WORD = re.compile(r"[a-z][a-z0-9'-]{2,}")
#: Words too common to say anything about what the LoRA learned.
_STOPWORDS = frozenset({
    "the", "and", "with", "for", "from", "that", "this", "are", "was", "were", "has",
    "have", "its", "into", "onto", "over", "under", "near", "next", "very", "photo",
    "image", "picture",
})
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class CardFiles:
    """Names (relative to the card) of what was published beside it."""

    diffusers: str | None = LORA_FILE
    kohya: str | None = None
    validation_images: list[str] = field(default_factory=list)
    metrics: str | None = None
    #: The base model's images for the same prompts and seeds (same order), and the prompts.
    base_images: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


def caption_sample(captions: list[str], n: int = CAPTION_SAMPLE) -> list[str]:
    """The first ``n`` distinct non-empty captions, in dataset order (stable)."""
    seen: dict[str, None] = {}
    for caption in captions:
        text = " ".join(caption.split())
        if text:
            seen.setdefault(text, None)
        if len(seen) == n:
            break
    return list(seen)


def frequent_words(captions: list[str], n: int = TOP_WORDS) -> list[tuple[str, int]]:
    """The most frequent caption words: likely trigger words. Ties break alphabetically."""
    counts = Counter(
        word
        for caption in captions
        for word in _WORD.findall(caption.lower())
        if word not in _STOPWORDS
    )
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]


def render_model_card(facts: LoraFacts, files: CardFiles, captions: list[str]) -> str:
    """The whole README.md: front matter, summary, captions, settings, images, usage."""
    sections = [
        _front_matter(facts),
        _summary(facts),
        _which_file(files),
        _captions(captions),
        _settings(facts),
        _data(facts),
        _validation(files),
        _base_vs_lora(files),
        _files(facts, files),
        _usage(facts, files),
    ]
    return "\n".join(s for s in sections if s).rstrip() + "\n"


# -- sections -------------------------------------------------------------------------


def _front_matter(facts: LoraFacts) -> str:
    """Hub model-card metadata; base_model only for a real Hub id (not a local path)."""
    lines = ["---", "library_name: diffusers", "tags:"]
    lines += [f"- {tag}" for tag in ("lora", "stable-diffusion", "text-to-image", "loraflow")]
    if _is_hub_id(facts.task.model.name):
        lines.append(f"base_model: {facts.task.model.name}")
    return "\n".join([*lines, "---", ""])


def _summary(facts: LoraFacts) -> str:
    return "\n".join([
        f"# {facts.title}",
        "",
        f"A LoRA adapter for `{public_name(facts.task.model.name)}` "
        f"(family `{facts.family.name}`, architecture `{facts.family.modelspec_architecture}`), "
        f"trained by loraflow for {facts.steps} steps.",
        "",
    ])


def _which_file(files: CardFiles) -> str:
    """Which file each tool takes, first: the two files look alike and load differently.

    The diffusers file loads fully in diffusers only: ComfyUI skips its UNet attention
    keys and, as it reads alpha only from per-layer ``.alpha`` tensors (which diffusers
    refuses in a file of this format), applies it at scale 1 (see engine.lora.loaders).
    """
    kohya = f"`{files.kohya}`" if files.kohya else None
    diffusers = f"`{files.diffusers}`" if files.diffusers else None
    rows = [
        ("diffusers (`load_lora_weights`), `loraflow generate`", diffusers or kohya),
        ("ComfyUI, AUTOMATIC1111 / Forge, InvokeAI",
         kohya or "none published: add `\"kohya\"` to `output.lora_formats`"),
    ]
    lines = ["## Which file to use", "", "| tool | file |", "| --- | --- |"]
    lines += [f"| {tool} | {name} |" for tool, name in rows]
    lines.append("")
    if diffusers:
        lines += [
            f"Do not give {diffusers} to ComfyUI, AUTOMATIC1111 / Forge or InvokeAI: "
            "ComfyUI loads only part of it (it skips the UNet attention layers), at "
            "strength 1 whatever the alpha. A file in the diffusers format cannot be "
            "written so that ComfyUI loads it fully without breaking it for diffusers"
            + (f"; the kohya file {kohya} loads fully in both." if kohya else "."),
            "",
        ]
    return "\n".join(lines)


def _captions(captions: list[str]) -> str:
    words = frequent_words(captions)
    sample = caption_sample(captions)
    if not words and not sample:
        return ""
    lines = ["## Trigger words and captions", ""]
    if words:
        lines.append(
            "Most frequent caption words (use them in prompts): "
            + ", ".join(f"`{word}` ({count})" for word, count in words)
        )
        lines.append("")
    if sample:
        lines += ["Some training captions:", "", "```text"]
        lines += [caption.replace("```", "'''") for caption in sample]
        lines += ["```", ""]
    return "\n".join(lines)


def _settings(facts: LoraFacts) -> str:
    task, train = facts.task, facts.task.train_args
    alpha, rank = task.lora_alpha, task.lora.rank
    rows = [
        ("base model", f"`{public_name(task.model.name)}` (revision `{task.model.revision}`)"),
        ("family", facts.family.name),
        ("LoRA rank", str(rank)),
        ("LoRA alpha", f"{alpha:g} (scale alpha/rank = {alpha / rank:g})"),
        ("target modules", ", ".join(f"`{m}`" for m in _as_list(task.target_modules))),
        ("steps", str(facts.steps)),
        ("learning rate", f"{train.learning_rate:g} ({train.lr_scheduler.lr_scheduler})"),
        ("batch size", f"{train.batch_size} x {train.gradient_accumulation_steps} accumulation"),
        ("resolution", f"{train.resolution}x{train.resolution}"),
        ("prediction type", facts.prediction_type),
        ("seed", str(task.seed)),
        ("precision", task.mixed_precision),
        ("dataset hash", f"`{facts.dataset_hash}`"),
    ]
    lines = ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join([*lines, ""])


def _data(facts: LoraFacts) -> str:
    """What an epoch trained: each subset by public name, and the buckets when on."""
    epoch = facts.epoch
    if epoch is None:
        return ""
    lines = [
        "## Training data",
        "",
        f"{epoch.images} images, {epoch.images_per_epoch} uses per epoch "
        f"(images x repeats) in {epoch.batches_per_epoch} batches.",
        "",
        "| subset | images | repeats | uses per epoch |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| `{s.name}` | {s.images} | {s.repeats} | {s.uses} |" for s in epoch.subsets]
    if is_bucketed(facts.task):
        lines += ["", "| bucket | images | uses per epoch | batches |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {b.bucket} | {b.images} | {b.uses} | {b.batches} |"
                  for b in epoch.buckets]
    if epoch.skipped:
        lines += ["", f"{epoch.skipped} file(s) were skipped while preparing the data "
                      "(see `run_summary.json`)."]
    return "\n".join([*lines, ""])


def _validation(files: CardFiles) -> str:
    if not files.validation_images:
        return ""
    lines = ["## Validation images", ""]
    lines += [f"![validation image {i}]({path})" for i, path in enumerate(files.validation_images)]
    return "\n".join([*lines, ""])


def _base_vs_lora(files: CardFiles) -> str:
    """Same prompt, same seed, without and with the LoRA: what the LoRA changed."""
    pairs = list(zip(files.base_images, files.validation_images, strict=False))
    if not pairs:
        return ""
    lines = [
        "## Base model vs LoRA",
        "",
        "Each row: one prompt and seed, drawn by the base model alone and with this LoRA.",
        "",
        "| prompt | base model | with this LoRA |",
        "| --- | --- | --- |",
    ]
    for i, (base, lora) in enumerate(pairs):
        prompt = files.prompts[i] if i < len(files.prompts) else ""
        text = prompt.replace("|", "/").replace("`", "'")
        cell = f"`{text}`" if text else f"image {i}"
        lines.append(f"| {cell} | ![base image {i}]({base}) | ![LoRA image {i}]({lora}) |")
    return "\n".join([*lines, ""])


def _files(facts: LoraFacts, files: CardFiles) -> str:
    lines = ["## Files", ""]
    if files.diffusers:
        lines.append(
            f"- `{files.diffusers}`: diffusers / PEFT format, for diffusers only "
            "(`load_lora_weights`"
            + (", then loraflow's `load_text_encoder_magnitudes`: see How to use"
               if _dora_text_encoder(facts) else "")
            + ")."
        )
    if files.kohya:
        lines.append(
            f"- `{files.kohya}`: kohya format (ComfyUI, AUTOMATIC1111 / Forge, InvokeAI)."
        )
    lines.append("- `task.json`: the task definition this LoRA was trained from.")
    lines.append("- `run_summary.json`: what the training run did.")
    if files.metrics:
        lines.append(f"- `{files.metrics}`: training metrics.")
    return "\n".join([*lines, ""])


def _usage(facts: LoraFacts, files: CardFiles) -> str:
    lines = ["## How to use", ""]
    weight = files.diffusers or files.kohya
    base, where = _base_model_reference(facts.task.model.name)
    lines += [
        "### diffusers",
        "",
        "```python",
        "from diffusers import AutoPipelineForText2Image",
        "",
        *where,
        f'pipe = AutoPipelineForText2Image.from_pretrained("{base}")',
        *_diffusers_load(weight, files.diffusers is not None and _dora_text_encoder(facts)),
        "```",
        "",
        "### loraflow",
        "",
        "```sh",
        f"loraflow generate --model {public_name(facts.task.model.name)} --lora {weight} "
        '--prompt "<prompt>" --seed 0',
        "```",
        "",
    ]
    if files.kohya:
        stem = files.kohya.removesuffix(".safetensors")
        lines += [
            "### ComfyUI",
            "",
            f"Copy `{files.kohya}` to `ComfyUI/models/loras/` and pick it in a "
            "`LoraLoader` node between the checkpoint loader and the sampler.",
            "",
            "### AUTOMATIC1111 / Forge",
            "",
            f"Copy `{files.kohya}` to `models/Lora/` and add `<lora:{stem}:1>` to the prompt.",
            "",
        ]
    return "\n".join(lines)


def _dora_text_encoder(facts: LoraFacts) -> bool:
    """A DoRA that trains a text encoder: diffusers' ``load_lora_weights`` leaves those
    layers' magnitudes untrained (engine.lora.diffusers_dora)."""
    return facts.task.lora.type == "dora" and facts.task.trains_text_encoder


def _diffusers_load(weight: str | None, magnitudes: bool) -> list[str]:
    """The snippet's load lines; with ``magnitudes``, loraflow puts the text encoders' DoRA
    magnitudes back after diffusers has loaded the rest, as ``load_into_pipeline`` does."""
    folder = "path/to/this/folder"
    if not magnitudes:
        return [f'pipe.load_lora_weights("{folder}", weight_name="{weight}")']
    return [
        f'pipe.load_lora_weights("{folder}", weight_name="{weight}", adapter_name="default_0")',
        "from safetensors.torch import load_file",
        "from engine.lora.diffusers_dora import load_text_encoder_magnitudes",
        "",
        "# diffusers leaves the text encoders' DoRA magnitudes untrained: put them back",
        f'load_text_encoder_magnitudes(pipe, load_file("{folder}/{weight}"), "default_0", '
        f'"{weight}")',
    ]


def _base_model_reference(name: str) -> tuple[str, list[str]]:
    """What ``from_pretrained`` should name in the snippet, and comment lines saying why.

    A Hub id is itself. An embedded ``loraflow/...`` model is a folder loraflow builds, so
    the snippet names the folder ``loraflow tiny-model`` writes. A local folder is named by
    its last part only: the card is published, and a local path must not leak into it.
    """
    if _is_hub_id(name):
        return name, []
    if name.startswith("loraflow/"):
        short = name.split("/", 1)[1]
        return f"./{short}", [
            f"# {name} is built locally by loraflow: `loraflow tiny-model {short} ./{short}`"
        ]
    folder = public_name(name)
    return f"./{folder}", [f"# the base model folder this LoRA was trained on ({folder})"]


def _as_list(value: list[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _is_hub_id(name: str) -> bool:
    """owner/name, not a local path and not one of loraflow's embedded tiny models."""
    return bool(_HUB_ID.match(name)) and not name.startswith("loraflow/")
