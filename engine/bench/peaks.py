"""Device peak FLOP/s and the model FLOPs utilisation (MFU) measured against it."""

from __future__ import annotations

from typing import Any

import torch

#: Dense (no sparsity) peak FLOP/s from vendor spec sheets, by a substring of the CUDA
#: device name; first match wins, so the more specific names come first. "tf32" applies
#: to fp32 training when torch lets matmuls use TF32, "fp32" otherwise.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM
    ("H200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
)


def device_peak_flops(device: torch.device, precision: str) -> tuple[str | None, float | None]:
    """(table row, dense peak FLOP/s) of a CUDA device in this precision, or (None, None)."""
    if device.type != "cuda":
        return None, None
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return peak_for_name(torch.cuda.get_device_name(device), precision, tf32=tf32)


def peak_for_name(name: str, precision: str, *,
                  tf32: bool = False) -> tuple[str | None, float | None]:
    """Look a device name up in :data:`PEAK_FLOPS`: (matched row, FLOP/s) or (None, None)."""
    key = "bf16" if precision in ("bf16", "fp16") else ("tf32" if tf32 else "fp32")
    for pattern, peaks in PEAK_FLOPS:
        if pattern in name:
            return pattern, peaks[key]
    return None, None


def utilisation(row: dict[str, Any], flops_per_sample: int | None,
                peak: float | None) -> dict[str, Any]:
    """Achieved model FLOP/s and, with a known device peak, the utilisation (MFU).

    Model FLOPs are those of a step without gradient checkpointing: the recomputation a
    lever adds is overhead, not useful work, so it does not raise the utilisation.
    """
    if row.get("status") != "ok" or not flops_per_sample:
        return {"achieved_tflops": None, "mfu": None}
    achieved = flops_per_sample * row["samples_per_second"]
    return {"achieved_tflops": achieved / 1e12, "mfu": achieved / peak if peak else None}
