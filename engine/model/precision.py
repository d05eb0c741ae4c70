"""Precision: the dtype of the frozen weights, and the autocast that goes with it.

One place decides both, so training, the text-encoder pass and validation rendering run
under the same mixed-precision rules: fp32 runs without autocast (no op is downcast),
fp16/bf16 run under ``torch.autocast`` on the weights' device.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from engine.errors import ConfigurationError

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights; fp16 on a CPU is refused rather than faked."""
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigurationError(
            "mixed_precision 'fp16' needs a GPU: CPUs have no fast fp16 kernels and fp16 "
            "training on them is unstable. Use 'bf16' or 'no' on a CPU."
        )
    return _DTYPES[mixed_precision]


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """A fresh context that runs forward passes in ``dtype`` (nothing to do for fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
