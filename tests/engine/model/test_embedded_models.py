"""The embedded tiny models load and run like real SD checkpoints, deterministically."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from engine.model.embedded import registry
from engine.model.embedded.demo_data import demo_samples
from engine.model.embedded.tiny_models import (
    BUILDER_VERSION,
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    TINY_MODEL_NAMES,
    build_tiny_model,
    clip_vocab,
)

MODEL_FIXTURES = {"tiny-sd1": "tiny_sd1", "tiny-sd2": "tiny_sd2", "tiny-sdxl": "tiny_sdxl"}
EXPECTED = {
    "tiny-sd1": {
        "pipeline": StableDiffusionPipeline,
        "scheduler": PNDMScheduler,
        "prediction_type": "epsilon",
        "vae_scaling": 0.18215,
        "pad_tokens": {"tokenizer": EOS_TOKEN},
    },
    "tiny-sd2": {
        "pipeline": StableDiffusionPipeline,
        "scheduler": DDIMScheduler,
        "prediction_type": "v_prediction",
        "vae_scaling": 0.18215,
        "pad_tokens": {"tokenizer": "!"},
    },
    "tiny-sdxl": {
        "pipeline": StableDiffusionXLPipeline,
        "scheduler": EulerDiscreteScheduler,
        "prediction_type": "epsilon",
        "vae_scaling": 0.13025,
        "pad_tokens": {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"},
    },
}
TEXT_ENCODERS = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}


@pytest.fixture(params=TINY_MODEL_NAMES)
def model(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(builder name, built folder) for each tiny model."""
    name = request.param
    return name, request.getfixturevalue(MODEL_FIXTURES[name])


def _tree_digests(root: str | Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _generate(folder: str, name: str, seed: int = 0) -> np.ndarray:
    pipe = EXPECTED[name]["pipeline"].from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
    ).images[0]
    assert image.size == (64, 64)
    return np.asarray(image)


def test_folder_has_diffusers_layout_with_safetensors_only(model: tuple[str, str]) -> None:
    name, folder = model
    root = Path(folder)
    subfolders = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if name == "tiny-sdxl":
        subfolders |= {"text_encoder_2", "tokenizer_2"}
    assert (root / "model_index.json").is_file()
    assert {p.name for p in root.iterdir() if p.is_dir()} == subfolders
    for sub in subfolders & {"unet", "vae", "text_encoder", "text_encoder_2"}:
        weights = {p.name for p in (root / sub).glob("*.safetensors")}
        assert len(weights) == 2, weights  # fp32 + fp16 variant
    assert not list(root.rglob("*.bin"))


def test_pipeline_makes_64px_image_and_same_seed_gives_same_pixels(
    model: tuple[str, str],
) -> None:
    name, folder = model
    first = _generate(folder, name)
    again = _generate(folder, name)
    assert first.shape == (64, 64, 3)
    np.testing.assert_array_equal(first, again)


def test_components_load_one_by_one_with_family_settings(model: tuple[str, str]) -> None:
    name, folder = model
    expected = EXPECTED[name]
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    scheduler = expected["scheduler"].from_pretrained(folder, subfolder="scheduler")
    assert unet.config.sample_size == 8
    assert vae.config.scaling_factor == expected["vae_scaling"]
    assert scheduler.config.prediction_type == expected["prediction_type"]
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.num_train_timesteps == 1000
    for sub, cls in TEXT_ENCODERS.items():
        if (Path(folder) / sub).is_dir():
            encoder = cls.from_pretrained(folder, subfolder=sub)
            assert type(encoder) is cls
            assert encoder.dtype == torch.float32


def test_training_noise_scheduler_keeps_prediction_type(model: tuple[str, str]) -> None:
    """Training code loads DDPMScheduler from any family's scheduler config."""
    name, folder = model
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.prediction_type == EXPECTED[name]["prediction_type"]
    assert scheduler.config.beta_start == 0.00085
    assert scheduler.config.beta_end == 0.012


def test_vae_downsamples_by_8_like_real_sd(model: tuple[str, str]) -> None:
    _, folder = model
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12)


def test_sdxl_unet_dims_match_its_two_text_encoders(tiny_sdxl: str) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    enc1 = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder")
    enc2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == enc1.config.hidden_size + enc2.config.hidden_size
    time_dims = 6 * unet.config.addition_time_embed_dim
    assert unet.config.projection_class_embeddings_input_dim == time_dims + (
        enc2.config.projection_dim
    )


def test_sd2_unet_uses_linear_projection_and_tuple_heads(tiny_sd2: str) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_sd2, subfolder="unet")
    assert unet.config.use_linear_projection is True
    assert isinstance(unet.config.attention_head_dim, (list, tuple))


def test_tokenizers_pad_like_real_family_and_stay_in_vocab(model: tuple[str, str]) -> None:
    name, folder = model
    for sub, pad_token in EXPECTED[name]["pad_tokens"].items():
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=sub)
        encoder_sub = sub.replace("tokenizer", "text_encoder")
        config = CLIPTextConfig.from_pretrained(folder, subfolder=encoder_sub)
        ids = tokenizer(
            "a red circle on a white background, photo of sks dog 123 éà",
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
        ).input_ids
        assert tokenizer.model_max_length == MODEL_MAX_LENGTH == len(ids)
        assert max(ids) < config.vocab_size == len(tokenizer)
        assert tokenizer.pad_token == pad_token
        assert ids[0] == tokenizer.bos_token_id == config.bos_token_id
        assert tokenizer.eos_token_id == config.eos_token_id
        assert tokenizer.eos_token_id in ids
        assert ids[-1] == tokenizer.pad_token_id == config.pad_token_id
        if pad_token == "!":
            assert tokenizer.pad_token_id == 0  # as in the real CLIP vocabulary


def test_every_demo_caption_word_is_a_single_token(tiny_sd1: str) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd1, subfolder="tokenizer")
    for sample in demo_samples():
        words = sample.text.split()
        ids = tokenizer(sample.text, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [f"{w}</w>" for w in words]


def test_vocab_and_merges_files_tokenize_like_tokenizer_json(
    tiny_sdxl: str, tmp_path: Path
) -> None:
    """Tools that read only the classic CLIP files (transformers 4 slow) agree with ours."""
    for sub in ("tokenizer", "tokenizer_2"):
        classic = tmp_path / sub
        classic.mkdir()
        for file_name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(Path(tiny_sdxl) / sub / file_name, classic / file_name)
        text = "A yellow triangle on a gray background; sks cat!"
        reference = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=sub)
        assert CLIPTokenizer.from_pretrained(classic)(text).input_ids == reference(text).input_ids


def test_text_encoder_weights_use_hub_key_layout(model: tuple[str, str]) -> None:
    _, folder = model
    for sub in TEXT_ENCODERS:
        for weights in (Path(folder) / sub).glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())  # noqa: SIM118
            assert keys
            assert all(k.startswith(("text_model.", "text_projection.")) for k in keys)


def test_fp16_variant_loads_as_half(model: tuple[str, str]) -> None:
    name, folder = model
    pipe = EXPECTED[name]["pipeline"].from_pretrained(folder, variant="fp16", dtype=torch.float16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    fp32 = EXPECTED[name]["pipeline"].from_pretrained(folder)
    assert fp32.unet.dtype == fp32.text_encoder.dtype == torch.float32


def test_rebuild_gives_byte_identical_files(model: tuple[str, str], tmp_path: Path) -> None:
    name, folder = model
    rebuilt = build_tiny_model(name, tmp_path / name)
    cached = {k: v for k, v in _tree_digests(folder).items() if k != registry.MARKER_FILENAME}
    assert _tree_digests(rebuilt) == cached


def test_build_leaves_callers_rng_and_default_dtype_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_model("tiny-sd1", tmp_path / "m")
    assert torch.equal(torch.rand(4), expected)
    assert torch.get_default_dtype() == torch.float32


def test_unknown_tiny_model_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model"):
        build_tiny_model("tiny-sd3", tmp_path)


def test_vocab_has_bytes_merges_then_special_tokens() -> None:
    vocab, merges = clip_vocab()
    assert vocab["!"] == 0
    assert vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == len(vocab) - 2
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert all(a + b in vocab for a, b in merges)


# --------------------------------------------------------------------------- registry


def test_embedded_model_ids_resolve_to_versioned_folder_in_loraflow_home(
    tiny_sd1: str, loraflow_home: Path
) -> None:
    path = Path(tiny_sd1)
    assert path == loraflow_home / "embedded" / "loraflow" / "tiny-sd1" / f"v{BUILDER_VERSION}"
    assert (path / registry.MARKER_FILENAME).is_file()
    assert registry.resolve_model("loraflow/tiny-sd1") == tiny_sd1


def test_resolving_again_reuses_the_build(tiny_sd2: str) -> None:
    weights = Path(tiny_sd2) / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert registry.resolve_model("loraflow/tiny-sd2") == tiny_sd2
    assert weights.stat().st_mtime_ns == before


def test_non_embedded_names_pass_through_unchanged() -> None:
    for name in ("runwayml/stable-diffusion-v1-5", "/some/local/model", "loraflow/other"):
        assert registry.resolve_model(name) == name
        assert registry.resolve_dataset(name) == name
        assert not registry.is_embedded(name)
    assert all(registry.is_embedded(n) for n in registry.EMBEDDED_MODELS)
    assert all(registry.is_embedded(n) for n in registry.EMBEDDED_DATASETS)


def test_loraflow_home_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFLOW_HOME")
    assert registry.loraflow_home() == Path.home() / ".cache" / "loraflow"


def test_losing_a_build_race_keeps_the_winner_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "embedded" / "thing" / "v1"

    def build_while_another_process_wins(folder: Path) -> None:
        (folder / "mine.txt").write_text("loser")
        target.mkdir(parents=True)
        (target / "winner.txt").write_text("winner")

    assert registry._build_once(target, build_while_another_process_wins) == target
    assert [p.name for p in target.iterdir()] == ["winner.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["v1"]


def test_concurrent_resolution_gives_one_complete_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path))
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(registry.resolve_model("loraflow/tiny-sd2")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3
    parent = Path(results[0]).parent
    assert os.listdir(parent) == [f"v{BUILDER_VERSION}"]  # no temp folders left behind
    assert (Path(results[0]) / "model_index.json").is_file()
