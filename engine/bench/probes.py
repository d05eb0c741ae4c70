"""Reading time and memory off the machine: device sync, peak memory, freeing memory.

On a GPU the figures come from the CUDA allocator; on a CPU from the process's resident
set size (Linux ``/proc/self``), which also counts the model weights.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import sys
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures work done, not work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator stats, or Linux's VmHWM via /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _proc_status_bytes(field_name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return None


def current_memory_bytes(device: torch.device) -> int | None:
    """What is held now (weights, cache): CUDA allocated, or the resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _proc_status_bytes("VmRSS")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset: CUDA max allocated, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak_rss = _proc_status_bytes("VmHWM")
    if peak_rss is not None:
        return peak_rss
    # no /proc: the peak since the process started (ru_maxrss is KiB on Linux, bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_kind(device: torch.device) -> str:
    """What the memory columns mean on this machine (they are not comparable across kinds)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset per configuration"
    if os.access("/proc/self/clear_refs", os.W_OK):
        return "peak RSS (VmHWM), reset per configuration"
    return "peak RSS since the process started (no /proc/self/clear_refs)"


def release_memory(device: torch.device) -> None:
    """Free what the last configuration left, so the next one's peak is its own.

    On a CPU, glibc keeps freed heap pages mapped (they still count as resident), so
    they are handed back to the OS with ``malloc_trim`` before the peak is reset.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
