"""Moving a micro-batch to the training device without waiting for it.

Why: on a GPU a plain ``tensor.to("cuda")`` from pageable memory blocks the host until
the copy is done, so the host cannot prepare the next micro-batch while the GPU trains on
this one. From pinned (page-locked) memory the copy is asynchronous: the host queues it
behind the running step and goes on, and with no host sync inside the step (the loss is
read once per step) it stays a micro-batch ahead. Torch's pinned-memory allocator keeps
the staging buffer alive until the copy has run. The values are the same bits either way.

On a CPU (or an already placed tensor) it is exactly ``tensor.to(device)``, which returns
the tensor itself when it is already there: that case returns early, without the call.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the CPU to CUDA through pinned memory, asynchronously."""
    if tensor.device == device:
        return tensor
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
