"""Byte-stable safetensors files.

The safetensors library writes the header's metadata from a hash map, so two saves of
the same tensors can differ in byte order. Networks that compare results across nodes,
and our own bit-for-bit resume tests, need equal inputs to give equal files. This writer
emits the same format with the header's keys sorted; any safetensors reader loads it.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_tensors

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def dump(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize ``tensors`` (sorted by name) with ``metadata``; same input, same bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def read_metadata(data: bytes) -> dict[str, str]:
    (size,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + size]).get("__metadata__", {}))


def canonical(data: bytes) -> bytes:
    """Re-serialize a safetensors file in the byte-stable form."""
    return dump(load_tensors(data), read_metadata(data))
