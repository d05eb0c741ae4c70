"""Which kernels a segment may use, and what it ran on: the two halves of "bit for bit".

Why this exists: a segment's result depends on (task, checkpoint) only if every kernel
that touches the weights sums in a fixed order. On a GPU that is a choice (cuBLAS, cuDNN
and the attention kernels each have faster, order-free variants), made here from
``train_args.deterministic``:

- ``true`` (the default, what a network that checks work needs): torch's deterministic
  algorithms (an op with no deterministic kernel raises, naming itself, instead of
  silently breaking the promise), cuDNN deterministic and no autotuning, a fixed cuBLAS
  workspace (``CUBLAS_WORKSPACE_CONFIG``), no TF32, and attention through the flash /
  memory-efficient SDPA kernels (torch picks their deterministic backward in this mode)
  with cuDNN attention off;
- ``false``: the fastest kernels: cuDNN autotuning, TF32 matmuls and convolutions, every
  SDPA kernel. Two runs may differ in the last bits.

:func:`apply_kernel_mode` is called by :func:`engine.train.segment.run_segment` before
the base model is loaded, which is the segment's first CUDA work: cuBLAS reads
``CUBLAS_WORKSPACE_CONFIG`` when it creates its first handle, so the variable must be set
before the first matmul on the device (the ``loraflow segment`` process starts fresh for
each segment; a process that already ran cuBLAS is warned about).

On a CPU nothing is switched: torch's CPU kernels are already run-to-run deterministic
for a fixed number of threads, and the flag would only add its fill-uninitialized-memory
cost. What does change CPU bits is the thread count (measured: 1 and 2 threads give
different LoRAs), so every checkpoint records what it ran on (:func:`runtime_record`,
in its manifest) and a resume on another thread count, device type or torch version is
told so plainly (:func:`resume_warnings`).

``deterministic`` is part of the training identity: on CUDA it changes the bits, so a
checkpoint trained one way refuses to resume the other (it is omitted while at its
default, so identities recorded before it existed keep their bytes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

#: The cuBLAS workspace setting torch's deterministic mode asks for (":16:8" also works,
#: slower); a value the user set is kept.
CUBLAS_WORKSPACE = ":4096:8"
_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


@dataclass(frozen=True)
class KernelMode:
    """The torch switches one value of ``train_args.deterministic`` stands for (CUDA)."""

    deterministic_algorithms: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    tf32: bool
    flash_sdp: bool
    mem_efficient_sdp: bool
    cudnn_sdp: bool
    math_sdp: bool = True  # the fallback for shapes no fused kernel takes


def kernel_mode(deterministic: bool) -> KernelMode:
    """The switches for ``deterministic`` (see the module docstring for why each)."""
    if deterministic:
        return KernelMode(deterministic_algorithms=True, cudnn_deterministic=True,
                          cudnn_benchmark=False, tf32=False, flash_sdp=True,
                          mem_efficient_sdp=True, cudnn_sdp=False)
    return KernelMode(deterministic_algorithms=False, cudnn_deterministic=False,
                      cudnn_benchmark=True, tf32=True, flash_sdp=True, mem_efficient_sdp=True,
                      cudnn_sdp=True)


def apply_kernel_mode(deterministic: bool, device: torch.device) -> KernelMode | None:
    """Set the kernel switches for training on ``device``; returns what was set.

    Every switch is set either way, so a process that runs segments of different tasks
    never inherits the previous one's mode. Nothing is set on a CPU (returns None).
    """
    if device.type != "cuda":
        return None
    mode = kernel_mode(deterministic)
    if deterministic:
        _set_cublas_workspace()
    set_switches(mode)
    log.info("CUDA kernels: %s", "deterministic" if deterministic else
             "fastest (train_args.deterministic is false: runs may differ in the last bits)")
    return mode


def _set_cublas_workspace() -> None:
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current in _DETERMINISTIC_WORKSPACES:
        return
    if torch.cuda.is_initialized():
        log.warning("CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set: if cuBLAS "
                    "already ran, deterministic matmuls will raise; start a fresh process")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


def set_switches(mode: KernelMode) -> None:
    """Put ``mode`` into torch's global switches (they exist on CPU builds too)."""
    torch.use_deterministic_algorithms(mode.deterministic_algorithms)
    torch.backends.cudnn.deterministic = mode.cudnn_deterministic
    torch.backends.cudnn.benchmark = mode.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = mode.tf32
    torch.backends.cudnn.allow_tf32 = mode.tf32
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(mode.flash_sdp)
    cuda.enable_mem_efficient_sdp(mode.mem_efficient_sdp)
    if hasattr(cuda, "enable_cudnn_sdp"):
        cuda.enable_cudnn_sdp(mode.cudnn_sdp)
    cuda.enable_math_sdp(mode.math_sdp)


def current_switches() -> KernelMode:
    """torch's switches as they are now (to put them back after a measurement or a test)."""
    cuda = torch.backends.cuda
    return KernelMode(
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        tf32=torch.backends.cuda.matmul.allow_tf32,
        flash_sdp=cuda.flash_sdp_enabled(), mem_efficient_sdp=cuda.mem_efficient_sdp_enabled(),
        cudnn_sdp=cuda.cudnn_sdp_enabled() if hasattr(cuda, "cudnn_sdp_enabled") else False,
        math_sdp=cuda.math_sdp_enabled(),
    )


# -- what a checkpoint ran on -------------------------------------------------------------


def runtime_record(device: torch.device) -> dict[str, Any]:
    """What decides the bits besides the task and the checkpoint: kept in the manifest."""
    record: dict[str, Any] = {"device_type": device.type, "torch": torch.__version__,
                              "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def resume_warnings(meta: dict[str, Any], device: torch.device) -> list[str]:
    """Why resuming the checkpoint whose manifest holds ``meta`` here will not match one
    run, bit for bit; each reason is logged as a warning. A checkpoint from before the
    record (no ``runtime`` in its manifest): none."""
    saved = meta.get("runtime")
    if not isinstance(saved, dict):
        return []
    now = runtime_record(device)
    out = []
    if saved.get("device_type") != now["device_type"]:
        out.append(f"checkpoint trained on {saved.get('device_type')}, resuming on "
                   f"{now['device_type']}: the result will not be bit-identical to one run")
    elif now["device_type"] == "cpu" and saved.get("torch_threads") != now["torch_threads"]:
        out.append(f"checkpoint trained with {_threads(saved.get('torch_threads'))}, resuming "
                   f"with {_threads(now['torch_threads'])}: the result will not be "
                   f"bit-identical to one run (set OMP_NUM_THREADS or torch threads to "
                   f"{saved.get('torch_threads')} to keep it)")
    elif saved.get("gpu", now.get("gpu")) != now.get("gpu"):
        out.append(f"checkpoint trained on a {saved.get('gpu')}, resuming on a {now['gpu']}: "
                   f"the result may not be bit-identical to one run")
    if saved.get("torch") != now["torch"]:
        out.append(f"checkpoint trained with torch {saved.get('torch')}, resuming with torch "
                   f"{now['torch']}: the result may not be bit-identical to one run")
    for message in out:
        log.warning(message)
    return out


def _threads(n: Any) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"
