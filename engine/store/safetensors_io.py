"""Safetensors bytes: the one place that writes, reads and restamps the format by hand.

A safetensors file is ``<u64 little-endian header length N><N bytes of JSON header><data>``;
the header maps each tensor name to its dtype, shape and ``data_offsets`` (counted from the
start of the data) and may hold a ``__metadata__`` map of strings.

The safetensors library writes the header's metadata from a hash map, so two saves of the
same tensors can differ in byte order. Networks that compare results across nodes, and our
own bit-for-bit resume tests, need equal inputs to give equal files. Two byte-stable forms
exist, and both must keep their exact bytes (checkpoints and published files are hashed):

* :func:`dump`, our own writer: tensors sorted by name, header keys in that order after
  ``__metadata__``, ASCII JSON. Checkpoints, the cache and the LoRA weights file use it.
* :func:`with_metadata`, a restamp of a file laid out by the library (tensors ordered by
  dtype and name): the header gets new metadata and is rewritten with sorted keys. The
  published LoRA files use it (``engine.lora.metadata.write_lora_file``).

Any safetensors reader loads both.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["data_offset", "dump", "read_header", "read_metadata", "tensor_data_hash",
           "with_metadata"]

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
    return _assemble(json.dumps(header, separators=(",", ":"), sort_keys=False), b"".join(chunks))


def data_offset(file_bytes: bytes) -> int:
    """Where the tensor data starts: after the 8-byte length and the JSON header."""
    if len(file_bytes) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (header_length,) = struct.unpack("<Q", file_bytes[:8])
    start = 8 + header_length
    if start > len(file_bytes):
        raise ValueError("not a safetensors file: header length past the end of the file")
    return start


def read_header(file_bytes: bytes) -> dict[str, Any]:
    """The parsed JSON header (tensor entries and ``__metadata__``)."""
    header = json.loads(file_bytes[8 : data_offset(file_bytes)])
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: the header is not a JSON object")
    return header


def read_metadata(file_bytes: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} when it has none)."""
    return dict(read_header(file_bytes).get("__metadata__") or {})


def tensor_data_hash(file_bytes: bytes) -> str:
    """sha256 (hex) of a safetensors file's tensor data: every byte after the header.

    The header holds the metadata, so this hash is the same whatever the metadata says
    and can be computed before it is written into that header (kohya's addnet hash).
    """
    return hashlib.sha256(file_bytes[data_offset(file_bytes) :]).hexdigest()


def with_metadata(file_bytes: bytes, metadata: Mapping[str, str]) -> bytes:
    """The file with its ``__metadata__`` replaced and the header JSON in a canonical form.

    Tensor ``data_offsets`` count from the start of the data, so a new header length
    leaves them valid. Keys are sorted and non-ASCII text is kept as UTF-8.
    """
    start = data_offset(file_bytes)
    header = read_header(file_bytes)
    header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _assemble(text, file_bytes[start:])


def _assemble(header_text: str, data: bytes) -> bytes:
    """Length, header padded with spaces to a multiple of 8 (keeps the data 8-byte aligned,
    as safetensors itself does), then the data."""
    raw = header_text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data
