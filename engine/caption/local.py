"""Captioning with a local vision-language model through transformers (backend "transformers").

Any model the installed transformers can load natively with ``from_pretrained`` and whose
config type is an image-to-text one (``AutoModelForImageTextToText``'s mapping, which in
transformers 5 covers BLIP, BLIP-2, GIT, Florence-2, Pix2Struct, LLaVA, Qwen2-VL...; the
older ``AutoModelForVision2Seq`` where that is what the library has). The auto class is
chosen from the config, never from the name; ``revision`` is passed to every load.

How the instruction (:func:`engine.caption.text.instruction`) reaches the model:

* **chat models** (the processor has a chat template: LLaVA, Qwen2-VL...): one user turn
  with the image and the instruction;
* **unconditional captioners** (BLIP, GIT, vision-encoder-decoder): no text at all. They
  were trained to caption from the image alone, and an instruction as a text prefix
  would only be continued as if it were the caption; the prompt is then not part of
  the fingerprint (changing it changes nothing they say);
* **every other model** (Florence-2's task tokens, Pix2Struct, BLIP-2): the instruction
  as the text input (for Florence-2, set ``prompt`` to e.g. ``<MORE_DETAILED_CAPTION>``).

Decoding is greedy (no sampling, one beam), ``max_length`` new tokens, in batches of
``batch_size``, on CUDA when there is one (bfloat16 there, float32 on the CPU; the
``LORAFLOW_DEVICE`` override of training holds here too): the same images give the same
captions on the same device. The config and processor are read when the captioner is
made (fast; a model that cannot be had is a :class:`CaptionError` then, without a hang:
offline mode is honoured and a missing model is said plainly); the weights are loaded on
the first call, so a re-run whose captions are all cached loads nothing heavy.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.caption.backend import CaptionError, CaptionOutcome, ImageToCaption
from engine.task.definition import CaptioningArgs

#: Model types that caption from the image alone (an instruction is never given them).
UNCONDITIONAL_TYPES = frozenset({"blip", "git", "vision-encoder-decoder"})
#: (mapping of config types, auto class) in the order tried; transformers 5 has the first.
_AUTO_CLASSES = (
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
    ("MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES", "AutoModelForVision2Seq"),
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class LocalCaptioner:
    """A :class:`~engine.caption.backend.Captioner` running a transformers model here."""

    def __init__(self, args: CaptioningArgs) -> None:
        from engine.caption.text import instruction
        from engine.model.embedded.registry import resolve_model

        self._args = args
        self._location = resolve_model(args.model)
        self._require_available()
        config = self._load("config", _auto("AutoConfig"))
        self._auto_class = _auto_class_for(config, args.model)
        self._encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self._processor = self._load("processor", _auto("AutoProcessor"))
        if getattr(self._processor, "chat_template", None):
            self._style = "chat"
        elif config.model_type in UNCONDITIONAL_TYPES:
            self._style = "unconditional"
        else:
            self._style = "text"
        self._instruction = "" if self._style == "unconditional" else instruction(args)
        self._model: Any = None
        self._fingerprint = {
            "backend": "transformers",
            "model": args.model,
            "revision": args.revision,
            "prompt": self._instruction,
            "prompting": self._style,
            "max_length": str(args.max_length),
            "weights": _weights_identity(self._location),
        }

    @property
    def fingerprint(self) -> dict[str, str]:
        return dict(self._fingerprint)

    @property
    def prompting(self) -> str:
        """How the instruction is given: "chat", "text" or "unconditional" (none)."""
        return self._style

    def caption(self, images: Sequence[ImageToCaption]) -> list[CaptionOutcome]:
        out: list[CaptionOutcome] = []
        size = self._args.batch_size
        for start in range(0, len(images), size):
            out += self._caption_batch(images[start:start + size])
        return out

    # -- loading ------------------------------------------------------------------------

    def _require_available(self) -> None:
        """Refuse at once a model that is no local folder and not to be had from the Hub."""
        from engine.model import hub

        if os.path.exists(self._location):
            return
        reason = hub.model_unavailable(self._location, "config.json", self._args.revision)
        if reason is not None:
            raise CaptionError(f"captioning model {self._args.model!r}{self._at()} {reason}")

    def _load(self, what: str, loader: Any, **kwargs: Any) -> Any:
        """``loader.from_pretrained`` of the model, its failures as a CaptionError."""
        from engine.model import hub

        try:
            return loader.from_pretrained(
                self._location, revision=self._args.revision,
                local_files_only=hub.offline_setting() is not None, **kwargs,
            )
        except (OSError, ValueError, KeyError) as err:
            raise CaptionError(
                f"captioning model {self._args.model!r}{self._at()}: its {what} could not be "
                f"loaded: {_first_line(err)}{hub.explain(err)}"
            ) from None

    def _at(self) -> str:
        revision = self._args.revision
        return f" (revision {revision!r})" if revision and revision != "main" else ""

    def _loaded_model(self) -> Any:
        if self._model is None:
            import torch

            device = caption_device()
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            model = self._load("weights", self._auto_class, dtype=dtype)
            self._model = model.to(device).eval()
        return self._model

    # -- captioning ---------------------------------------------------------------------

    def _caption_batch(self, batch: Sequence[ImageToCaption]) -> list[CaptionOutcome]:
        import torch

        model = self._loaded_model()
        try:
            inputs = self._inputs([item.image.convert("RGB") for item in batch])
            inputs = inputs.to(model.device)
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                generated = model.generate(
                    **inputs, max_new_tokens=self._args.max_length, do_sample=False,
                    num_beams=1,
                )
        except (RuntimeError, ValueError, TypeError) as err:
            names = ", ".join(item.name for item in batch[:3])
            raise CaptionError(
                f"captioning model {self._args.model!r} failed on {names}"
                f"{' ...' if len(batch) > 3 else ''}: {_first_line(err)}"
            ) from err
        if not self._encoder_decoder and "input_ids" in inputs:
            generated = generated[:, inputs["input_ids"].shape[1]:]  # the prompt comes back
        texts = self._processor.batch_decode(generated, skip_special_tokens=True)
        return [CaptionOutcome(t.strip()) if t.strip() else CaptionOutcome(None, "empty answer")
                for t in texts]

    def _inputs(self, images: list[Any]) -> Any:
        """The processor's tensors for a batch, with the instruction as the style wants."""
        processor = self._processor
        if self._style == "unconditional":
            return processor(images=images, return_tensors="pt")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not self._encoder_decoder:
            tokenizer.padding_side = "left"  # decoder-only: generation continues the prompt
        if self._style == "chat":
            turn = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": self._instruction}]}]
            prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
            texts = [prompt] * len(images)
        else:
            texts = [self._instruction] * len(images)
        return processor(images=images, text=texts, return_tensors="pt", padding=True)


def caption_device() -> Any:
    """Where the captioning model runs: the training device's rule (CUDA when present)."""
    from engine.model.loading import training_device

    return training_device()


def _auto(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def _auto_class_for(config: Any, model: str) -> Any:
    """The auto class whose mapping knows the config's type; else a CaptionError."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping_name, class_name in _AUTO_CLASSES:
        mapping = getattr(modeling_auto, mapping_name, None)
        if mapping and config.model_type in mapping and hasattr(transformers, class_name):
            return getattr(transformers, class_name)
    raise CaptionError(
        f"captioning model {model!r} is a {config.model_type!r} model, which this "
        f"transformers ({transformers.__version__}) does not know as an image-to-text "
        "(captioning) model; choose a captioning model (BLIP, GIT, Florence-2, LLaVA, "
        "Qwen2-VL class) or the 'openai' backend"
    )


def _weights_identity(location: str) -> str:
    """For a local folder, a hash of its weight files' names and sizes (weights replaced
    under the same path are not the same model); for a Hub id, "" (its revision says it)."""
    root = Path(location)
    if not root.is_dir():
        return ""
    files = sorted((p.relative_to(root).as_posix(), p.stat().st_size)
                   for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    return hashlib.sha256(repr(files).encode()).hexdigest()[:16]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
