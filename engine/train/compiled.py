"""``train_args.compile``: the UNet's blocks compiled with ``torch.compile``.

Why blocks and not the whole UNet: each down/mid/up block compiles to its own graph, so
a new bucket shape recompiles small graphs instead of one huge one, and diffusers' own
control flow between blocks (extra inputs, skip connections) stays eager. Compiling is
in place (``nn.Module.compile``): the parameters, and with them the LoRA weights a
checkpoint saves and restores, are the very same objects.

Compiled kernels fuse elementwise work, which moves the last bits: the option is part
of the training identity and off by default. :func:`uncompile` undoes it for the bench,
which reuses one UNet for every configuration it times.
"""

from __future__ import annotations

from typing import Any


def unet_blocks(unet: Any) -> list[Any]:
    """The UNet's down, mid and up blocks: the units that get compiled."""
    blocks = [*unet.down_blocks, *unet.up_blocks]
    if unet.mid_block is not None:
        blocks.insert(len(unet.down_blocks), unet.mid_block)
    return blocks


def compile_unet_blocks(unet: Any, backend: str = "inductor") -> int:
    """Compile each block of ``unet`` in place; returns how many were compiled."""
    blocks = unet_blocks(unet)
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def uncompile(unet: Any) -> None:
    """Back to eager mode (what :meth:`torch.nn.Module.compile` set, unset)."""
    for block in unet_blocks(unet):
        block._compiled_call_impl = None


def is_compiled(unet: Any) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in unet_blocks(unet))
