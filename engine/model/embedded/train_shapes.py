"""Pre-train the ``loraflow/tiny-shapes`` base model: tiny-sd1 taught to draw coloured shapes.

Why: the random-weight tiny models make every code path run, but their images are noise,
so a quickstart cannot show that a LoRA learned anything. This script trains the tiny-sd1
architecture (its tokenizer, text encoder, configs and scheduler, with the changes listed
in ``shapes_model.py``) on drawn shapes - the demo-shapes colours, shapes and backgrounds,
at 64 px - until it draws them from their captions. The weights are committed
(``weights/tiny-shapes.safetensors``) and loaded by ``shapes_model.build_shapes_model``;
nothing retrains them at run time, and the tests only load them.

Rerun (one CPU core, about 7 minutes; put the printed sha256 into ``shapes_model.py``)::

    OMP_NUM_THREADS=1 python -m engine.model.embedded.train_shapes

Three stages, each seeded: (1) the VAE learns to encode and decode the captioned images
and as many shapes in random colours (so that it can code colours the UNet never drew,
which a LoRA may then teach), on 32 px crops (it is convolutional, and crops are 4x
cheaper); (2) a pool of images is encoded
once and the latent scaling factor set so the latents have unit variance, as SD's 0.18215
does for its VAE; (3) the UNet learns to denoise those latents (v-prediction, min-SNR
weighting; an exponential moving average of its weights is what is saved), conditioned
on the frozen, random tiny-sd1 text encoder; one caption in ten is empty so that
classifier-free guidance works. The text encoder is saved too, so the file alone fixes
every weight. Same seed, same library versions and CPU kind: same file.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.model.embedded.demo_data import BACKGROUNDS, COLORS, SHAPES
from engine.model.embedded.shape_images import SIZE, caption, draw
from engine.model.embedded.shapes_model import METADATA_KEY, WEIGHTS_FILE, shapes_pipeline

SEED = 20260101
CAPTION_DROPOUT = 0.1
POSTERIOR_LOGVAR = -12.0  # posterior std exp(-6) = 0.0025, before scaling


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1], the VAE's input range."""
    data = torch.stack([
        torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3)
        for im in images
    ])
    return data.permute(0, 3, 1, 2).float().div(127.5).sub(1)


def shape_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` drawn images with their captions; every (colour, shape, background) in turn."""
    rng = random.Random(seed)
    combos = [(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]
    images, captions = [], []
    for i in range(n):
        color, shape, background = combos[i % len(combos)]
        images.append(draw(shape, COLORS[color], BACKGROUNDS[background], rng))
        captions.append(caption(color, shape, background))
    return to_tensor(images), captions


def any_color_pool(n: int, seed: int) -> torch.Tensor:
    """``n`` shapes in random colours (any RGB) on random or demo backgrounds, for the VAE.

    Why not the captioned pool: a VAE that saw only the four demo colours maps every
    other colour onto them (magenta came back green and blue), and then no LoRA could
    ever teach the model a new colour. The UNet learns only the captioned colours.
    """
    rng = random.Random(seed)
    images = []
    for i in range(n):
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        if i % 2:
            background = tuple(rng.randint(0, 255) for _ in range(3))
        else:
            background = list(BACKGROUNDS.values())[rng.randrange(len(BACKGROUNDS))]
        images.append(draw(SHAPES[i % len(SHAPES)], fill, background, rng))
    return to_tensor(images)


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae: Any, images: torch.Tensor, steps: int, seed: int, log_every: int,
              lr: float = 2e-3) -> None:
    """Autoencoder training on random 32 px crops (L1 + MSE on the posterior mean).

    The posterior's spread is then fixed to a tiny constant (``POSTERIOR_LOGVAR``): flat
    shapes need no KL regularisation, and loraflow samples its latents from the posterior
    (mean + std * noise), which must not blur them.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, 50)
        idx = torch.randint(0, len(images), (16,), generator=gen)
        x0, y0 = (int(v) for v in torch.randint(0, SIZE - 32 + 1, (2,), generator=gen))
        batch = images[idx, :, y0:y0 + 32, x0:x0 + 32]
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample
        loss = (recon - batch).abs().mean() + (recon - batch).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"vae  step {step:5d} loss {loss.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad():
        latent_channels = vae.config.latent_channels
        vae.quant_conv.weight[latent_channels:] = 0
        vae.quant_conv.bias[latent_channels:] = POSTERIOR_LOGVAR


@torch.no_grad()
def encode_pool(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of ``images`` (unscaled), in chunks."""
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)])


@torch.no_grad()
def encode_captions(pipe: Any, captions: list[str]) -> dict[str, torch.Tensor]:
    """Text-encoder output of each distinct caption (and of ""), as the pipeline makes it."""
    out = {}
    for text in sorted({*captions, ""}):
        ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out[text] = pipe.text_encoder(ids)[0][0]
    return out


def train_unet(pipe: Any, latents: torch.Tensor, captions: list[str], steps: int, seed: int,
               log_every: int, batch_size: int = 32, lr: float = 3e-3) -> Any:
    """Denoising training of ``pipe.unet``; returns the EMA copy of the UNet."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    embeds = encode_captions(pipe, captions)
    gen = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, 100)
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT
        texts = ["" if d else captions[i] for i, d in zip(idx, drop, strict=True)]
        context = torch.stack([embeds[text] for text in texts])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, context).sample
        snr = alphas[t] / (1 - alphas[t])
        if v_prediction:  # min-SNR-5 weighting, for either target
            target = noise_scheduler.get_velocity(x0, noise, t)
            weight = snr.clamp(max=5) / (snr + 1)
        else:
            target, weight = noise, snr.clamp(max=5) / snr
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"unet step {step:5d} loss {loss.item():.4f}", flush=True)
    unet.eval()
    return ema


def trained_state(pipe: Any, unet: Any) -> dict[str, torch.Tensor]:
    """Every weight of the model, keys prefixed by component, stored as float16."""
    parts = {"unet": unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return {
        f"{name}.{key}": value.detach().to(torch.float16).contiguous()
        for name, module in parts.items()
        for key, value in module.state_dict().items()
    }


def save_weights(path: Path, state: dict[str, torch.Tensor], scaling_factor: float,
                 info: dict[str, Any]) -> str:
    """Write the weights file; return its sha256.

    The metadata is one key holding sorted JSON: safetensors writes a metadata map in no
    fixed key order, so two keys would make the same weights hash differently.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    facts = {"base": "tiny-sd1", "vae_scaling_factor": scaling_factor, "training": info}
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(facts, sort_keys=True)})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(vae_steps: int, unet_steps: int, pool_size: int, seed: int,
          log_every: int = 100) -> tuple[Any, dict[str, torch.Tensor], float]:
    """Run the three stages; return (pipeline, weights to save, latent scaling factor)."""
    torch.manual_seed(seed)
    pipe = shapes_pipeline()
    images, captions = shape_pool(pool_size, seed)
    vae_images = torch.cat([images, any_color_pool(pool_size, seed + 3)])
    train_vae(pipe.vae, vae_images, vae_steps, seed + 1, log_every)
    raw = encode_pool(pipe.vae, images)
    scaling = float(f"{1.0 / raw.std().item():.4g}")
    pipe.vae.register_to_config(scaling_factor=scaling)
    ema = train_unet(pipe, raw * scaling, captions, unet_steps, seed + 2, log_every)
    pipe.unet = ema
    return pipe, trained_state(pipe, ema), scaling


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--pool-size", type=int, default=2160)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.monotonic()
    _, state, scaling = train(args.vae_steps, args.unet_steps, args.pool_size, args.seed)
    info = {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
            "pool_size": args.pool_size, "seed": args.seed, "size": SIZE}
    digest = save_weights(args.out, state, scaling, info)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {time.monotonic() - t0:.0f} s")
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
