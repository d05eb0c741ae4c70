"""``loraflow/tiny-shapes``: a tiny SD1-style model that has really learned to draw shapes.

Why: the random-weight tiny models run every code path but draw noise, so nobody can
see a LoRA learn on them. This model has tiny-sd1's tokenizer, text encoder, UNet and
scheduler configs, and weights trained by ``train_shapes.py`` on drawn coloured shapes
(the demo-shapes colours, shapes and backgrounds at 64 px): prompted with a demo-shapes
caption, it draws that shape in that colour. Its weights are committed
(``weights/tiny-shapes.safetensors``, float16, under 2 MB) and checked against
:data:`WEIGHTS_SHA256`; the registry builds the diffusers folder from them on first use.

Three changes from tiny-sd1, each measured on the training's sample grids: the VAE
normalises over all its channels (``norm_num_groups=1``) and the UNet over groups of 8
and 16 (``norm_num_groups=4``): with tiny-sd1's one channel per group, every group norm
removes each channel's mean over the image, and a flat background colour hardly passes
(VAE loss after 400 steps: 0.17 with one group, 0.6-0.8 with tiny-sd1's). And it
predicts v (``v_prediction``, as SD 2.x does): at the few steps it trains, epsilon
prediction drew backgrounds of the wrong colour. The VAE also learned shapes in random
colours, so colours the UNet never drew (what a LoRA may teach) survive encoding, if
paler. Draw with a guidance scale of about 2 (:data:`GUIDANCE_SCALE`): this small a
model breaks above 3.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SHAPES_MODEL_ID = "loraflow/tiny-shapes"
WEIGHTS_FILE = Path(__file__).parent / "weights" / "tiny-shapes.safetensors"
#: sha256 of the committed weights file; ``train_shapes`` prints it. A new file gets a
#: new cache folder (see ``SHAPES_MODEL_VERSION``), never a stale build.
WEIGHTS_SHA256 = "775c759a28b8fcbd66d743da46314a0ed17a17d72dc99802e0e4565ed84e1034"
SHAPES_MODEL_VERSION = f"1-{WEIGHTS_SHA256[:12]}"
VAE_OVERRIDES: dict[str, Any] = {"norm_num_groups": 1}
UNET_OVERRIDES: dict[str, Any] = {"norm_num_groups": 4}
SCHEDULER_OVERRIDES: dict[str, Any] = {"prediction_type": "v_prediction"}
#: Classifier-free guidance the model draws well with; above about 3 its colours break.
GUIDANCE_SCALE = 2.0
COMPONENTS = ("unet", "vae", "text_encoder")
#: The weights file's one metadata key: JSON with the VAE scaling factor and how it trained.
METADATA_KEY = "loraflow_tiny_shapes"


def shapes_pipeline(vae_scaling_factor: float = 1.0) -> Any:
    """The untrained architecture (seeded random weights): tiny-sd1 with the overrides."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from engine.model.embedded.tiny_models import build_tiny_pipeline

    base = build_tiny_pipeline("tiny-sd1")
    vae_config = {**base.vae.config, **VAE_OVERRIDES, "scaling_factor": vae_scaling_factor}
    unet_config = {**base.unet.config, **UNET_OVERRIDES}
    scheduler = type(base.scheduler).from_config({**base.scheduler.config, **SCHEDULER_OVERRIDES})
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(vae_config).eval(),
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=UNet2DConditionModel.from_config(unet_config).eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def weights_sha256(path: Path = WEIGHTS_FILE) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_trained_pipeline(path: Path = WEIGHTS_FILE, *, check: bool = True) -> Any:
    """The trained pipeline in memory (float32, CPU) from the committed weights file.

    ``check`` refuses a file whose sha256 is not :data:`WEIGHTS_SHA256` (a truncated
    checkout, a half-finished retraining): the model must be the one the tests measured.
    """
    from safetensors import safe_open

    if check and weights_sha256(path) != WEIGHTS_SHA256:
        raise ValueError(
            f"{path} is not the tiny-shapes weights this version expects "
            f"(sha256 {WEIGHTS_SHA256}); restore it, or update WEIGHTS_SHA256 after "
            "retraining with `python -m engine.model.embedded.train_shapes`"
        )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key).float() for key in f.keys()}  # noqa: SIM118
    pipe = shapes_pipeline(float(json.loads(metadata[METADATA_KEY])["vae_scaling_factor"]))
    for name in COMPONENTS:
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        getattr(pipe, name).load_state_dict(state, strict=True)
    return pipe


def build_shapes_model(out_dir: str | Path) -> Path:
    """Write ``loraflow/tiny-shapes`` into ``out_dir`` as a diffusers folder (+ fp16 variant)."""
    from engine.model.embedded.tiny_models import save_pipeline_folder

    return save_pipeline_folder(load_trained_pipeline(), out_dir)
