"""Use a trained LoRA: render images with it, and say what a LoRA file holds.

Images come from the base model's own diffusers pipeline with the LoRA loaded by
diffusers' ``load_lora_weights``, which reads both our files: the diffusers one (its
``lora_adapter_metadata`` header carries alpha) and the kohya one (``.alpha`` tensors).
The file is handed over as a file, never as a dict: from a dict diffusers cannot see the
header and would load a diffusers file with alpha != rank at the wrong strength.

The LoRA strength is applied with ``set_adapters(..., adapter_weights=[scale])``, which
scales the UNet and text-encoder LoRA layers alike; scale 0 renders exactly the base
model's image. Image i is drawn from a CPU generator seeded with ``seed + i``, so a seed
gives the same pixels on every run of the same machine kind, as A1111's batch seeds do.

LoHa, LoKr and DoRA (LyCORIS) files are not diffusers' to load (it refuses the first two
and drops DoRA's ``dora_scale``): their weight changes are merged into the base weights
(:mod:`engine.infer.merged_network`). A diffusers / PEFT DoRA file is loaded by diffusers,
and the text-encoder magnitudes it drops are put back (:mod:`engine.lora.diffusers_dora`).
A kohya file's bundled embeddings (``bundle_emb``) and ``--embedding`` textual-inversion
files are loaded as textual inversions (:mod:`engine.lora.user_embeddings`), so their
tokens work in prompts.

Only ``.safetensors`` is read: a pickle file (``.bin``/``.pt``/``.ckpt``) can run code
when loaded, so it is refused, never unpickled.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.errors import LoraflowError
from engine.lora.formats import LoraModule, detect_format, guess_family, lora_modules
from engine.lora.lycoris_file import NetworkModule, is_lycoris, network_modules, split_bundle
from engine.lora.metadata import read_metadata, tensor_data_hash
from engine.store import storage

ADAPTER_NAME = "lora"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch zip archive, raw pickle protocol 2+
_ABBREVIATE_AT = 200


class LoraFileRefused(LoraflowError):
    """The LoRA file is not one we can load safely and faithfully."""


# -- reading a LoRA file ---------------------------------------------------------------


def read_lora_bytes(location: str) -> bytes:
    """The bytes of a ``.safetensors`` LoRA (path or fsspec URL); pickles are refused."""
    if location.lower().endswith(PICKLE_SUFFIXES):
        raise LoraFileRefused(
            f"{storage.redact(location)}: pickle-based LoRA files "
            f"({', '.join(PICKLE_SUFFIXES)}) can run arbitrary code when loaded and are "
            "never unpickled; convert it to .safetensors with a tool you trust"
        )
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        raise LoraFileRefused(f"LoRA file not found: {storage.redact(location)}") from None
    try:
        read_metadata(data)
    except (ValueError, UnicodeDecodeError) as exc:
        # Diagnosed only after the safetensors parse failed: a safetensors header length
        # can start with the same byte as a pickle.
        where = storage.redact(location)
        if data.startswith(_PICKLE_MAGIC):
            raise LoraFileRefused(
                f"{where} is a pickle (torch.save) file, not safetensors; it is never unpickled"
            ) from None
        raise LoraFileRefused(f"{where} is not a safetensors file: {exc}") from None
    return data


def _tensors(data: bytes, location: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except SafetensorError as exc:
        where = storage.redact(location)
        raise LoraFileRefused(f"{where}: unreadable safetensors: {exc}") from None


# -- inspecting -----------------------------------------------------------------------


def inspect_lora(path: str) -> dict[str, Any]:
    """What a LoRA file holds: format, family guess, ranks, alphas, targets, metadata,
    and which tools load it fully (``loads_fully_in``; ``other_tools``: what to use there)."""
    from engine.lora.loaders import file_support
    from engine.lora.user_embeddings import summary

    data = read_lora_bytes(path)
    tensors, bundles = _split_bundle(_tensors(data, path), path)
    metadata = read_metadata(data)
    fmt, modules, network = _described(tensors, metadata, path)
    family, reason = guess_family(tensors, modules, metadata)
    components: dict[str, int] = {}
    for m in modules:
        components[m.component] = components.get(m.component, 0) + 1
    algorithm = _algorithm(network, tensors)
    support = file_support(fmt, family, modules, algorithm, bool(bundles))
    scales = [n.scale for n in network] if network else [(m.alpha or m.rank) / m.rank
                                                          for m in modules]
    return {
        "algorithm": algorithm,
        "factors": sorted({f"{n.factor[0]}x{n.factor[1]}" for n in network if n.factor}),
        "bundled_embeddings": [summary(t, v) for t, v in sorted(bundles.items())],
        "path": storage.redact(path),
        "format": fmt,
        "family": family,
        "family_reason": reason,
        "modules": len(modules),
        "components": components,
        "ranks": sorted({n.rank for n in network if n.rank} if network
                        else {m.rank for m in modules}),
        "alphas": sorted({n.alpha if n.alpha is not None else float(n.rank or 1) for n in network}
                         if network else
                         {m.alpha if m.alpha is not None else float(m.rank) for m in modules}),
        "alpha_stored": all(m.alpha is not None for m in modules),
        "scales": sorted(set(scales)),
        "target_kinds": sorted({m.kind for m in modules}),
        "loads_fully_in": list(support.loads_fully_in),
        "other_tools": support.elsewhere,
        "tensor_data_sha256": tensor_data_hash(data),
        "metadata": abbreviate_metadata(metadata),
    }


def _split_bundle(tensors: dict[str, torch.Tensor], location: str) -> tuple[dict, dict]:
    from engine.errors import LoraflowError

    try:
        return split_bundle(tensors)
    except LoraflowError as exc:
        raise LoraFileRefused(f"{storage.redact(location)}: {exc}") from None


def _described(tensors: dict[str, torch.Tensor], metadata: dict[str, str], location: str
               ) -> tuple[str, list[LoraModule], list[NetworkModule]]:
    """(format, modules, LyCORIS modules or []) of a bundle-free state dict."""
    from engine.errors import LoraflowError

    where = storage.redact(location)
    fmt = detect_format(tensors)
    try:
        if fmt == "unknown" and is_lycoris(tensors) and all(
                k.startswith(("lora_unet_", "lora_te")) for k in tensors):
            network = network_modules(tensors)
            return "kohya", [n.as_lora_module() for n in network], network
        if fmt == "unknown" and _diffusers_dora(tensors):
            plain = {k: v for k, v in tensors.items() if not k.endswith("lora_magnitude_vector")}
            return "diffusers", lora_modules(plain, metadata), []
    except LoraflowError as exc:
        raise LoraFileRefused(f"{where}: {exc}") from None
    if fmt == "unknown":
        raise LoraFileRefused(
            f"{where}: neither a diffusers nor a kohya / LyCORIS LoRA "
            f"(e.g. key {next(iter(sorted(tensors)), '<none>')!r})"
        )
    return fmt, lora_modules(tensors, metadata), []


def _diffusers_dora(tensors: dict[str, torch.Tensor]) -> bool:
    """A diffusers / PEFT DoRA file: LoRA keys plus ``lora_magnitude_vector``."""
    rest = [k for k in tensors if not k.endswith(".lora_magnitude_vector")]
    return len(rest) < len(tensors) and detect_format(rest) == "diffusers"


def _algorithm(network: list[NetworkModule], tensors: dict[str, torch.Tensor]) -> str:
    """lora, locon (a LoRA on 3x3 convolutions too), dora, loha or lokr; "+"-joined when
    a file mixes them (a LoRA's modules beside LoCon ones count as LoCon)."""
    if network:
        found = {n.algorithm for n in network}
    else:
        dora = any(k.endswith("lora_magnitude_vector") for k in tensors)
        conv = any(k.endswith(("lora_A.weight", "lora_down.weight")) and t.dim() == 4
                   and tuple(t.shape[2:]) != (1, 1) for k, t in tensors.items())
        found = {"dora" if dora else "locon" if conv else "lora"}
    if "locon" in found or "dora" in found:
        found.discard("lora")
    return "+".join(sorted(found))


def abbreviate_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Header metadata fit for a terminal: the task summarised, long values cut."""
    out = {}
    for key, value in sorted(metadata.items()):
        if key == "loraflow_task":
            value = _task_summary(value)
        elif key == "lora_adapter_metadata":
            value = _adapter_summary(value)
        if len(value) > _ABBREVIATE_AT:
            value = value[:_ABBREVIATE_AT] + "..."
        out[key] = value
    return out


def _task_summary(text: str) -> str:
    try:
        task = json.loads(text)
        parts = {
            "model": task["model"]["name"],
            "dataset": task["dataset"].get("name") or task["dataset"].get("url"),
            "rank": task["lora"]["rank"],
            "alpha": task["lora"].get("alpha"),
            "resolution": task["train_args"]["resolution"],
            "seed": task["seed"],
        }
    except (ValueError, KeyError, TypeError):
        return text
    return ", ".join(f"{k}={v}" for k, v in parts.items())


def _adapter_summary(text: str) -> str:
    try:
        config = json.loads(text)
    except ValueError:
        return text
    keys = sorted(k for k in config if k.endswith((".r", ".lora_alpha")))
    return ", ".join(f"{k}={config[k]}" for k in keys)


def format_report(report: dict[str, Any]) -> str:
    """``inspect_lora``'s dict as readable text."""
    lines = [
        f"file:       {report['path']}",
        f"format:     {report['format']}",
        f"algorithm:  {report['algorithm']}",
        f"family:     {report['family']} ({report['family_reason']})",
        f"modules:    {report['modules']} "
        + "(" + ", ".join(f"{k}: {v}" for k, v in sorted(report["components"].items())) + ")",
        f"rank:       {', '.join(map(str, report['ranks'])) or 'none (whole LoKr factors)'}",
        f"alpha:      {', '.join(f'{a:g}' for a in report['alphas'])}"
        + ("" if report["alpha_stored"] else " (not stored: loaders use alpha = rank)"),
        f"scale:      {', '.join(f'{s:g}' for s in report['scales'])} (alpha / rank"
        + ("; 1 where both LoKr factors are whole)" if report["factors"] else ")"),
        f"targets:    {', '.join(report['target_kinds'])}",
        f"loads fully in: {', '.join(report['loads_fully_in']) or 'none known'}",
        f"other tools:    {report['other_tools']}",
        f"data hash:  {report['tensor_data_sha256']}",
    ]
    if report["factors"]:
        lines.insert(6, f"factor:     {', '.join(report['factors'])} (LoKr w1 shape)")
    for emb in report["bundled_embeddings"]:
        lines.append(f"embedding:  {emb['token']}: {emb['vectors']} vector(s) for "
                     f"{', '.join(emb['encoders'])} (bundled)")
    if report["metadata"]:
        lines.append("metadata:")
        lines += [f"  {k}: {v}" for k, v in report["metadata"].items()]
    return "\n".join(lines)


# -- generating -----------------------------------------------------------------------


def generate_images(
    model: str,
    lora: str | None,
    prompt: str,
    *,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    lora_scale: float = 1.0,
    num_images: int = 1,
    negative_prompt: str | None = None,
    revision: str = "main",
    variant: str | None = None,
    device: str | None = None,
    embeddings: list[str] | None = None,
) -> list[Image.Image]:
    """Render ``num_images`` images; each carries its A1111 ``parameters`` in ``.info``.

    ``embeddings``: textual-inversion files (path or URL), each called by its token."""
    pipe, lora_data = open_pipeline(
        model, lora, lora_scale=lora_scale, revision=revision, variant=variant, device=device,
        embeddings=embeddings,
    )
    named = (lora, lora_data, lora_scale) if lora and lora_data is not None else None
    return render_images(
        pipe, model, named, prompt, seed=seed, steps=steps, guidance=guidance, width=width,
        height=height, num_images=num_images, negative_prompt=negative_prompt,
    )


def open_pipeline(
    model: str,
    lora: str | None,
    *,
    lora_scale: float = 1.0,
    revision: str = "main",
    variant: str | None = None,
    device: str | None = None,
    embeddings: list[str] | None = None,
) -> tuple[Any, bytes | None]:
    """(pipeline on ``device`` with ``lora`` loaded at ``lora_scale`` and the
    textual-inversion files ``embeddings``, the LoRA's bytes).

    Apart from :func:`render_images`, so that a long-lived caller (``loraflow demo``)
    loads the model once and renders many times.
    """
    from engine.infer.pipeline import load_pipeline
    from engine.model.loading import training_device
    from engine.task.definition import ModelArgs

    model_args = ModelArgs(name=model, revision=revision, variant=variant)
    # float32 and diffusers' defaults (safety checker included): what a user would get
    pipe, _, family = load_pipeline(model_args, torch.float32, safety_checker=True)
    lora_data = read_lora_bytes(lora) if lora else None
    if lora_data is not None:
        load_lora(pipe, lora_data, lora, family.name, lora_scale, family=family)
    for location in embeddings or []:
        load_embedding_file(pipe, family, location)
    pipe.to(torch.device(device) if device else training_device())
    pipe.set_progress_bar_config(disable=True)
    return pipe, lora_data


def render_images(
    pipe: Any,
    model: str,
    lora: tuple[str, bytes, float] | None,
    prompt: str,
    *,
    seed: int,
    steps: int,
    guidance: float,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    negative_prompt: str | None = None,
) -> list[Image.Image]:
    """Render with an opened pipeline as it is; ``lora`` (location, bytes, scale) only
    names the LoRA in the images' ``parameters`` (None: the base model's images)."""
    images = []
    for i in range(num_images):
        image = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=torch.Generator(device="cpu").manual_seed(seed + i),
        ).images[0]
        image.info["parameters"] = image_parameters(
            prompt, negative_prompt, steps=steps, guidance=guidance, seed=seed + i,
            size=image.size, sampler=type(pipe.scheduler).__name__, model=model,
            lora=lora,
        )
        images.append(image)
    return images


def load_lora(pipe: Any, data: bytes, location: str, family_name: str, scale: float,
              family: Any = None) -> None:
    """Load a diffusers, kohya or LyCORIS LoRA file into ``pipe`` at strength ``scale``,
    with the embeddings it bundles (``family``: the model's, for those).

    The LoRA's prediction type (``modelspec.prediction_type``) is given to the scheduler:
    a v-prediction LoRA sampled as epsilon renders noise.
    """
    from engine.infer.merged_network import merge_network

    where = storage.redact(location)
    tensors, bundles = _split_bundle(_tensors(data, location), location)
    metadata = read_metadata(data)
    network: list[NetworkModule] = []
    if detect_format(tensors) != "unknown" or is_lycoris(tensors):  # else: diffusers decides
        _, modules, network = _described(tensors, metadata, location)
        lora_family, reason = guess_family(tensors, modules, metadata)
        if lora_family not in ("unknown", family_name):
            raise LoraFileRefused(
                f"{where} is a {lora_family} LoRA ({reason}); the model is {family_name}"
            )
    if bundles:
        _load_bundles(pipe, family, bundles, where)
        data = _without_bundles(tensors, metadata)
    if network:
        merge_network(pipe, network, scale, where)
    else:
        _load_with_diffusers(pipe, data, location, family_name)
        set_lora_scale(pipe, scale)
    _apply_prediction_type(pipe, metadata.get("modelspec.prediction_type"))


def _without_bundles(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The file without its bundled embeddings, header kept (diffusers reads it)."""
    from engine.store.safetensors_io import dump

    return dump(tensors, metadata)


def _load_bundles(pipe: Any, family: Any, bundles: dict, where: str) -> None:
    from engine.lora.user_embeddings import encoder_vectors, load_embeddings

    if family is None:
        raise LoraFileRefused(f"{where} bundles embeddings; the model's family is needed")
    load_embeddings(pipe, {token: encoder_vectors(token, named, family, where)
                           for token, named in bundles.items()}, where)


def load_embedding_file(pipe: Any, family: Any, location: str) -> str:
    """Put a textual-inversion file on ``pipe``; return the token it is called by."""
    from engine.lora.user_embeddings import encoder_vectors, load_embeddings, token_from_file

    data = read_lora_bytes(location)
    where = storage.redact(location)
    token = token_from_file(read_metadata(data), storage.basename(location))
    load_embeddings(pipe, {token: encoder_vectors(token, _tensors(data, location), family,
                                                  where)}, where)
    return token


def _load_with_diffusers(pipe: Any, data: bytes, location: str, family_name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "lora.safetensors").write_bytes(data)
        try:
            pipe.load_lora_weights(tmp, weight_name="lora.safetensors", adapter_name=ADAPTER_NAME)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise LoraFileRefused(
                f"diffusers cannot load {storage.redact(location)} into this {family_name} "
                f"model: {exc}"
            ) from None
    from safetensors.torch import load as load_tensors

    from engine.lora.diffusers_dora import load_text_encoder_magnitudes

    load_text_encoder_magnitudes(pipe, load_tensors(data), ADAPTER_NAME, storage.redact(location))


def set_lora_scale(pipe: Any, scale: float) -> None:
    """Set the strength of the LoRA :func:`load_lora` loaded (0: the base model's images)."""
    from engine.infer.merged_network import has_merged_network, set_strength

    if has_merged_network(pipe):
        set_strength(pipe, scale)
    else:
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[float(scale)])


def _apply_prediction_type(pipe: Any, spec_value: str | None) -> None:
    wanted = {"v": "v_prediction", "epsilon": "epsilon"}.get(spec_value or "")
    if wanted and pipe.scheduler.config.get("prediction_type") != wanted:
        pipe.scheduler = type(pipe.scheduler).from_config(
            {**pipe.scheduler.config, "prediction_type": wanted}
        )


def image_parameters(
    prompt: str,
    negative_prompt: str | None,
    *,
    steps: int,
    guidance: float,
    seed: int,
    size: tuple[int, int],
    sampler: str,
    model: str,
    lora: tuple[str, bytes, float] | None,
) -> str:
    """The A1111 ``parameters`` text: prompt, negative prompt, then ``Key: value`` pairs.

    A LoRA is named as A1111 does: ``<lora:name:scale>`` in the prompt and its short
    hash (first 12 hex digits of the tensor-data sha256) under ``Lora hashes``, which
    Civitai uses to link the resource.
    """
    fields = [
        f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {guidance:g}", f"Seed: {seed}",
        f"Size: {size[0]}x{size[1]}", f"Model: {model}",
    ]
    text = prompt
    if lora is not None:
        location, data, scale = lora
        name = storage.basename(location).removesuffix(".safetensors")
        text = f"{prompt} <lora:{name}:{scale:g}>"
        fields.append(f'Lora hashes: "{name}: {tensor_data_hash(data)[:12]}"')
    lines = [text]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def write_images(images: list[Image.Image], output_dir: str, stem: str = "image") -> list[str]:
    """Write ``<stem>-NN.png`` files with their ``parameters`` text chunk; return the URLs."""
    from engine.infer.validation import png_bytes

    urls = []
    for i, image in enumerate(images):
        url = storage.join(output_dir, f"{stem}-{i:02d}.png")
        storage.write_bytes(url, png_bytes(image, image.info.get("parameters", "")))
        urls.append(url)
    return urls
