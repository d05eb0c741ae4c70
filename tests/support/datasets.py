"""Builders for dataset tests: small images, image folders, and preparing into a folder."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image

from engine.data.dataset import prepare_dataset
from engine.data.layout import DatasetManifest
from engine.task.definition import DatasetArgs

#: Files of a small archive: nested folders, text and binary.
FILES = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)), "sub/deeper/c.txt": b"gamma"}


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    """A deflated zip at ``path`` holding ``files`` ({name: bytes})."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def png(width: int = 24, height: int = 16, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def image_folder(folder: Path, items: list[tuple[str, bytes, object]]) -> Path:
    """An imagefolder: files plus metadata.jsonl with ``file_name`` and ``text``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as meta:
        for name, data, text in items:
            (folder / name).write_bytes(data)
            meta.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return folder


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = struct.pack(">I", 1 << 20) + b"IDAT" + b"\x00" * 64  # data "to follow"
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + idat
    )


def prepare(args: DatasetArgs, dest: str | Path, tmp_path: Path) -> DatasetManifest:
    """Prepare ``args`` at ``dest``, with scratch under ``tmp_path/work``."""
    return prepare_dataset(args, str(dest), work_dir=tmp_path / "work")
