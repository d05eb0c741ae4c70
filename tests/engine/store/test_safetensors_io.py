"""The one safetensors module: our writer's bytes are fixed, any reader loads both forms,
and the LoRA file writer restamps through it."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save

from engine.lora import metadata as lora_metadata
from engine.store import safetensors_io
from engine.store.safetensors_io import (
    data_offset,
    dump,
    read_header,
    read_metadata,
    tensor_data_hash,
    with_metadata,
)

TENSORS = {
    "b.lora_A.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "a.alpha": torch.tensor(8.0),
    "c.half": torch.arange(3, dtype=torch.float16),
    "d.index": torch.arange(2),
    "e.empty": torch.zeros(0),
}
META = {"z": "ünïcode", "a": "1"}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dump_bytes_are_fixed() -> None:
    """Recorded from the writer as it was before the store was one module: checkpoints and
    caches hold these bytes, so they may never move."""
    assert hashlib.sha256(dump(TENSORS, META)).hexdigest() == (
        "4d0bf572e589dd2686f69d1203753278fcc3cbc81fee9682d918bd84113d58c8"
    )
    assert hashlib.sha256(dump(TENSORS)).hexdigest() == (
        "8e43681027c3a36beade07d2dd7112e6086f8095b7d3716df7aa6792859044ef"
    )


def test_dump_reads_back_with_the_library() -> None:
    data = dump(TENSORS, META)
    assert _equal(load_tensors(data), TENSORS)
    assert read_metadata(data) == META
    assert read_metadata(dump(TENSORS)) == {}
    assert data_offset(data) % 8 == 0


def test_with_metadata_keeps_the_data_and_sorts_the_header() -> None:
    library = save(dict(TENSORS), metadata={"b": "2", "a": "1"})
    stamped = with_metadata(library, {"y": "é", "x": "0"})
    assert stamped[data_offset(stamped) :] == library[data_offset(library) :]
    assert tensor_data_hash(stamped) == tensor_data_hash(library)
    assert read_metadata(stamped) == {"x": "0", "y": "é"}
    header_text = stamped[8 : data_offset(stamped)].decode("utf-8").rstrip()
    assert header_text == json.dumps(read_header(stamped), sort_keys=True,
                                     separators=(",", ":"), ensure_ascii=False)
    assert _equal(load_tensors(stamped), TENSORS)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\x01", "shorter than"), (b"\xff" * 8 + b"{}", "past the end"),
     (b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "not a JSON object")],
)
def test_not_a_safetensors_file_is_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_metadata(data)


def test_lora_headers_are_read_and_written_through_this_module() -> None:
    assert lora_metadata.read_metadata is safetensors_io.read_metadata
    assert lora_metadata.tensor_data_hash is safetensors_io.tensor_data_hash
    data = lora_metadata.write_lora_file(TENSORS, META)
    digest = tensor_data_hash(data)
    assert read_metadata(data) == {**META, "sshs_model_hash": digest,
                                   "modelspec.hash_sha256": f"0x{digest}"}
