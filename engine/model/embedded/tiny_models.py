"""Tiny random-weight Stable Diffusion models (SD1, SD2, SDXL families), built locally.

Why: tests, demos and CI must exercise the real loading and training code paths
(``from_pretrained`` on a diffusers folder, real UNet/VAE/CLIP classes, real scheduler
configs) without network access and within seconds on a CPU. The models here have the
exact folder layout and component classes of the real families, but about 1 M random
parameters (UNet 0.8 M; SDXL UNet 2 M), and are byte-identical for the same name and
library versions (fixed seeds, CPU, float32).

Family traits that training code branches on are kept: SD1 pads prompts with the eos
token and predicts epsilon; SD2 pads with ``"!"``, uses linear attention projections,
tuple head counts and v-prediction; SDXL has two text encoders (the second with a
projection), ``text_time`` added conditioning and a VAE scaling factor of 0.13025.
Every VAE downsamples by 8, so ``r`` pixels map to ``r / 8`` latent pixels.

Heavy libraries (torch, diffusers, transformers) are imported inside the functions that
need them, so importing this module (or the registry) stays cheap.

Why one module over 400 lines: the three families' configs and builders are read side
by side (their differences are the point) and share the seeded component builders.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Bump when anything below changes the built files, so cached builds (see registry.py)
# are rebuilt instead of reused.
BUILDER_VERSION = "1"

TINY_MODEL_NAMES: tuple[str, ...] = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
_SEED = 0
_CONFIG_DIR = Path(__file__).parent / "configs"

# Scheduler betas shared by all real SD 1.x / 2.x / XL checkpoints.
_SD_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as byte-level BPE (GPT-2, CLIP) does.

    Why: the CLIP tokenizer's byte-level pre-tokenizer turns text into these characters
    before BPE runs, so the vocabulary's base symbols must be exactly this alphabet, in
    this order (printable bytes keep their own character; the rest are shifted past 255).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    first = set(printable)
    return dict(sorted(mapping.items(), key=lambda kv: (kv[0] not in first, kv[0])))


def _vocab_words() -> list[str]:
    """Read the word list whose words become single tokens (comments and blanks skipped)."""
    text = (_CONFIG_DIR / "vocab_words.txt").read_text(encoding="utf-8")
    words = [line.strip().lower() for line in text.splitlines()]
    return sorted({w for w in words if w and not w.startswith("#")})


def _word_symbols(word: str, byte_chars: dict[int, str]) -> tuple[str, ...]:
    """Split a word into byte symbols, marking the last with ``</w>`` like CLIP's BPE."""
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    chars[-1] += "</w>"
    return tuple(chars)


def _apply_merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every non-overlapping occurrence of ``pair`` left to right."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _learn_merges(words: list[str], byte_chars: dict[int, str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol (ties broken lexicographically).

    Why our own loop instead of a trainer library: the result must be identical on every
    machine and library version, and the word list is tiny.
    """
    corpus = [_word_symbols(w, byte_chars) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in corpus:
            counts.update(zip(symbols, symbols[1:], strict=False))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_apply_merge(symbols, best) for symbols in corpus]


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Compute the vocabulary once per process (immutable, so the cache cannot be altered)."""
    byte_chars = bytes_to_unicode()
    base = list(byte_chars.values())
    merges = _learn_merges(_vocab_words(), byte_chars)
    tokens = [*base, *(c + "</w>" for c in base), *(a + b for a, b in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return tuple(vocab.items()), tuple(merges)


def clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Return the tiny CLIP vocabulary (a fresh dict) and merges, laid out like CLIP's.

    Layout (same order as openai/clip-vit-large-patch14): the 256 byte symbols, the same
    256 with ``</w>``, one token per merge, then ``<|startoftext|>`` and
    ``<|endoftext|>`` as the two highest ids (so ``"!"`` is id 0, as SD2 relies on).
    """
    items, merges = _vocab_and_merges()
    return dict(items), merges


def make_tokenizer(pad_token: str) -> Any:
    """Build a CLIPTokenizer over the tiny vocabulary with the given pad token."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )


def _write_vocab_files(tokenizer_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` next to ``tokenizer.json``.

    Why: transformers 5 saves only ``tokenizer.json``; the real SD repos ship the two
    classic CLIP files, which transformers 4.x (slow tokenizer) and other tools read.
    """
    vocab, merges = clip_vocab()
    (tokenizer_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False), encoding="utf-8"
    )
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (tokenizer_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- configs


def _text_encoder_config(pad_token: str, hidden_act: str, projection_dim: int) -> Any:
    """CLIP text config: 32 wide, 2 layers, real special-token ids of our vocabulary."""
    from transformers import CLIPTextConfig

    vocab, _ = clip_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[pad_token],
    )


def _vae_config(scaling_factor: float) -> dict[str, Any]:
    """4 encoder blocks (3 downsamples, factor 8) like the real SD VAE, only 8-16 wide."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": scaling_factor,
        "force_upcast": True,
    }


_UNET_COMMON: dict[str, Any] = {
    "sample_size": 8,  # latent of 64 px
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "norm_num_groups": 32,
}

_UNET_SD1: dict[str, Any] = {
    **_UNET_COMMON,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}

_UNET_SD2: dict[str, Any] = {
    **_UNET_SD1,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "upcast_attention": True,
}

_SDXL_TIME_EMBED_DIM = 8
_SDXL_TEXT2_PROJECTION_DIM = 32

_UNET_SDXL: dict[str, Any] = {
    **_UNET_COMMON,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 4),
    "use_linear_projection": True,
    "cross_attention_dim": 32 + 32,  # hidden sizes of text_encoder + text_encoder_2
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
    # 6 micro-conditioning numbers (original size, crop, target size) + pooled text embeds
    "projection_class_embeddings_input_dim": _SDXL_TIME_EMBED_DIM * 6 + _SDXL_TEXT2_PROJECTION_DIM,
}


def _check_name(name: str) -> None:
    if name not in TINY_MODEL_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {TINY_MODEL_NAMES}")


# --------------------------------------------------------------------------- components


@contextmanager
def _seeded(seed: int = _SEED) -> Iterator[None]:
    """Seed torch for one component, on CPU in float32, leaving the caller's state alone.

    Why: the same name must give the same bytes whatever the calling process did before
    (its RNG position, ``set_default_dtype``, ``set_default_device``), and building a
    model must not shift the caller's random stream.
    """
    import torch

    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.set_default_dtype(torch.float32)
        try:
            torch.manual_seed(seed)
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _make_unet(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    with _seeded():
        return UNet2DConditionModel(**config).eval()


def _make_vae(scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    with _seeded():
        return AutoencoderKL(**_vae_config(scaling_factor)).eval()


def _make_text_encoder(config: Any, with_projection: bool = False) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded():
        return cls(config).eval()


def _build_sd1() -> Any:
    """SD 1.5 style: quick_gelu text encoder, eos padding, PNDM epsilon scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(
        **_SD_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=_make_vae(0.18215),
        text_encoder=_make_text_encoder(_text_encoder_config(EOS_TOKEN, "quick_gelu", 32)),
        tokenizer=make_tokenizer(EOS_TOKEN),
        unet=_make_unet(_UNET_SD1),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd2() -> Any:
    """SD 2.1 (768, v-prediction) style: gelu text encoder, ``"!"`` padding, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        **_SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=_make_vae(0.18215),
        text_encoder=_make_text_encoder(_text_encoder_config("!", "gelu", 32)),
        tokenizer=make_tokenizer("!"),
        unet=_make_unet(_UNET_SD2),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> Any:
    """SDXL base style: two text encoders (second projected), Euler epsilon scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS,
        interpolation_type="linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )
    text_config_2 = _text_encoder_config("!", "gelu", _SDXL_TEXT2_PROJECTION_DIM)
    return StableDiffusionXLPipeline(
        vae=_make_vae(0.13025),
        text_encoder=_make_text_encoder(_text_encoder_config(EOS_TOKEN, "quick_gelu", 32)),
        text_encoder_2=_make_text_encoder(text_config_2, with_projection=True),
        tokenizer=make_tokenizer(EOS_TOKEN),
        tokenizer_2=make_tokenizer("!"),
        unet=_make_unet(_UNET_SDXL),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


_BUILDERS = {"tiny-sd1": _build_sd1, "tiny-sd2": _build_sd2, "tiny-sdxl": _build_sdxl}

# torch's RNG and default dtype are process-global: two threads building at once would
# interleave their seeded random streams and get different weights.
_BUILD_LOCK = threading.Lock()


def build_tiny_pipeline(name: str) -> Any:
    """Construct the in-memory pipeline for ``name`` (random weights, seeded, float32, CPU)."""
    _check_name(name)
    with _BUILD_LOCK:
        return _BUILDERS[name]()


# --------------------------------------------------------------------------- saving


_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_TOKENIZERS = ("tokenizer", "tokenizer_2")
_WEIGHTED = ("unet", "vae", *_TEXT_ENCODERS)


def _legacy_clip_keys(weights_file: Path) -> None:
    """Rewrite a CLIPTextModel checkpoint to the ``text_model.*`` key layout.

    Why: transformers 5 dropped the ``text_model`` wrapper inside CLIPTextModel and saves
    bare ``embeddings.*``/``encoder.*`` keys, but every real SD checkpoint on the Hub (and
    transformers 4.x) uses ``text_model.*``. Writing the Hub layout makes our models load
    through the same key-conversion path as a Hub model, and with either major version.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights_file), framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    if all(key.startswith(("text_model.", "text_projection.")) for key in tensors):
        return
    renamed = {f"text_model.{key}": value for key, value in tensors.items()}
    save_file(renamed, str(weights_file), metadata=metadata)


def _fix_text_encoder_keys(out_dir: Path) -> None:
    for sub in _TEXT_ENCODERS:
        for weights in sorted((out_dir / sub).glob("model*.safetensors")):
            _legacy_clip_keys(weights)


def _save_fp16_variant(out_dir: Path) -> None:
    """Add ``*.fp16.safetensors`` next to each fp32 weights file (``variant="fp16"``).

    Why from the saved files instead of ``pipe.to(float16).save_pretrained(variant=...)``:
    that would also rewrite every ``config.json`` with ``"dtype": "float16"``, and
    transformers 5 loads with ``dtype="auto"`` by default, so the plain (fp32) load would
    silently become fp16. Converting the files keeps the configs of the fp32 save and
    the exact key layout (see ``_legacy_clip_keys``).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    for sub in _WEIGHTED:
        for weights in sorted((out_dir / sub).glob("*.safetensors")):
            if weights.name.endswith(".fp16.safetensors"):
                continue
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata() or {"format": "pt"}
                half = {key: f.get_tensor(key).to(torch.float16) for key in f.keys()}  # noqa: SIM118
            target = weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors"))
            save_file(half, str(target), metadata=metadata)


def build_tiny_model(name: str, out_dir: str | Path) -> Path:
    """Build tiny model ``name`` into ``out_dir`` in the diffusers folder layout.

    ``out_dir`` may exist (it is written into, files of a previous build overwritten).
    Returns ``out_dir`` as a Path. The folder loads with
    ``StableDiffusionPipeline.from_pretrained`` (``tiny-sd1``, ``tiny-sd2``) or
    ``StableDiffusionXLPipeline.from_pretrained`` (``tiny-sdxl``), component-wise with
    ``subfolder=...``, and with ``variant="fp16"``.
    """
    return save_pipeline_folder(build_tiny_pipeline(name), out_dir)


def save_pipeline_folder(pipe: Any, out_dir: str | Path) -> Path:
    """Save a pipeline of tiny components as the folders above are laid out.

    Hub key layout for the text encoders, an fp16 variant of every weights file, and
    the classic ``vocab.json``/``merges.txt`` beside each tokenizer (also used by the
    trained ``loraflow/tiny-shapes``, see ``shapes_model.py``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    _fix_text_encoder_keys(out)
    _save_fp16_variant(out)
    for sub in _TOKENIZERS:
        if (out / sub).is_dir():
            _write_vocab_files(out / sub)
    return out
