"""Every random draw of training comes from a generator named by what it is for.

A generator is seeded by (task seed, purpose, counters) through a hash, so the draw for
sample 17 of epoch 3 is the same whether it happens in the first segment or after four
resumes, in a batch of 2 or of 16, in the main process or a data-loader worker. Nothing
reads or advances a global RNG, which is what makes k segments equal one run.
"""

from __future__ import annotations

import hashlib

import torch

#: The purposes in use; a new kind of draw gets a new name here, never a shared one.
PURPOSES = frozenset(
    {
        "data_order",  # per epoch: permutation of the dataset
        "batch_order",  # per epoch: order of the micro-batches when there are several buckets
        "caption",  # per (epoch, sample): which of several captions
        "tag_shuffle",  # per (epoch, sample): order of a caption's tags
        "caption_dropout",  # per (epoch, sample): whether the caption is dropped
        "crop",  # per (epoch, sample): random crop offsets
        "crop_candidates",  # per example: the crop positions train_args.cached_crops caches
        "flip",  # per (epoch, sample): horizontal flip
        "latent",  # per (epoch, sample): sample from the VAE posterior
        "noise",  # per (epoch, sample): diffusion noise and noise offset
        "timestep",  # per (epoch, sample): diffusion timestep
        "lora_init",  # once: initial adapter weights
        "validation",  # per image: validation sampling
        "validation_prompts",  # once: which captions become validation prompts
        "validation_loss",  # per (held-out example, timestep): the validation loss's noise
        "validation_loss_examples",  # once: which training examples the validation loss uses
        "bench_adapters",  # once: the random latents and text the adapter bench trains on
    }
)


def derive_seed(seed: int, purpose: str, *counters: int) -> int:
    """A 63-bit seed from (seed, purpose, counters); stable across runs and platforms."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random purpose {purpose!r}")
    text = "/".join([str(seed), purpose, *map(str, counters)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def generator(seed: int, purpose: str, *counters: int) -> torch.Generator:
    """A fresh CPU generator for one purpose; draws are then moved to the device."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, purpose, *counters))
