"""engine.data.images through preparation: bad images are skipped, each with its reason
and its file name; unusual ones are converted."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data.errors import DatasetError
from engine.data.layout import open_dataset
from engine.task.definition import DatasetArgs
from tests.support.datasets import encoded, image_folder, png, png_header_claiming, prepare

# -- bad images --------------------------------------------------------------------------


def test_bad_images_are_skipped_with_a_report(tmp_path: Path) -> None:
    good = png()
    src = image_folder(
        tmp_path / "src",
        [
            ("good.png", good, "good"),
            ("empty.png", b"", "zero bytes"),
            ("truncated.png", png(64, 64)[:60], "truncated"),
            ("garbage.png", b"this is not an image at all" * 10, "corrupt"),
            ("bomb.png", png_header_claiming(100_000, 100_000), "decompression bomb"),
            ("tiny.png", png(4, 30), "too small"),
            ("big.png", png_header_claiming(9000, 9000), "over our limit"),
        ],
    )
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == 1
    reasons = {s["index"]: s["reason"] for s in manifest.skipped}
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.captions(0) == ["good"] and ds.image_bytes(0) == good
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6]  # rows in metadata.jsonl order
    assert "empty" in reasons[1]
    assert "unreadable" in reasons[2] and "unreadable" in reasons[3]
    assert "too large" in reasons[4] and "too large" in reasons[6]
    assert "too small" in reasons[5]


def test_dataset_without_usable_image_is_an_error(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src", [("a.png", b"", "x"), ("b.png", b"junk" * 9, "y")])
    with pytest.raises(DatasetError, match="no usable image"):
        prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_exif_rotated_image_gets_its_rotated_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif.tobytes())
    src = image_folder(tmp_path / "src", [("r.jpg", data, "rotated")])
    prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.size(0) == (20, 40)
    assert ds.image(0).size == (20, 40)
    assert ds.image_bytes(0) == data


def _palette_with_transparent_half() -> Image.Image:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (8, 0, 16, 16))
    image.info["transparency"] = 0
    return image


def _two_frame_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def test_unusual_modes_load_as_rgb(tmp_path: Path) -> None:
    sixteen = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    assert sixteen.mode == "I;16"
    items = [
        ("a-cmyk.jpg", encoded(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"), "cmyk"),
        ("b-16bit.png", encoded(sixteen, "PNG"), "16-bit"),
        (
            "c-palette.png",
            encoded(_palette_with_transparent_half(), "PNG", transparency=0),
            "palette with transparency",
        ),
        ("d-la.png", encoded(Image.new("LA", (16, 16), (0, 0)), "PNG"), "grey + alpha"),
        ("e-anim.gif", _two_frame_gif(), "animated"),
    ]
    src = image_folder(tmp_path / "src", items)
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.count == 5, manifest.skipped
    ds = open_dataset(str(tmp_path / "ds"))
    images = [ds.image(i) for i in range(5)]
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in images)
    cmyk, sixteen_rgb, palette, la, anim = images
    assert cmyk.getpixel((4, 4)) == (255, 255, 255)
    assert sixteen_rgb.getpixel((4, 4)) == (255, 255, 255)  # scaled, not clipped garbage
    assert palette.getpixel((2, 2)) == (255, 255, 255)  # transparent: white background
    assert palette.getpixel((12, 2)) == (255, 0, 0)
    assert la.getpixel((2, 2)) == (255, 255, 255)
    assert anim.getpixel((2, 2)) == (255, 0, 0)  # first frame


# -- skipped images are named ------------------------------------------------------------


def test_skipped_images_are_named_by_file_without_memory_addresses(tmp_path: Path) -> None:
    src = image_folder(
        tmp_path / "src",
        [("good.png", png(), "good"), ("garbage.png", b"not an image" * 10, "bad"),
         ("empty.png", b"", "empty")],
    )
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert [(s["index"], s["file"]) for s in manifest.skipped] == [
        (1, "garbage.png"), (2, "empty.png")]
    garbage = manifest.skipped[0]["reason"]
    assert garbage.startswith("unreadable image: UnidentifiedImageError")
    assert "0x" not in garbage and "BytesIO" not in garbage  # same text on every run


def test_skipped_images_of_an_archive_are_named_inside_it_not_by_the_scratch_path(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("my-set/pics/a.png", png())
        zf.writestr("my-set/pics/b.png", b"junk" * 20)
        rows = [{"file_name": f"pics/{n}", "text": n} for n in ("a.png", "b.png")]
        zf.writestr("my-set/metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    manifest = prepare(DatasetArgs(url=archive.as_uri()), tmp_path / "ds", tmp_path)
    assert [s["file"] for s in manifest.skipped] == ["pics/b.png"]


def test_skipped_rows_of_a_csv_are_named_as_the_data_wrote_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    (src / "data.csv").write_text("image,text\na.png,one\nmissing/b.png,two\n")
    manifest = prepare(DatasetArgs(name=str(src)), tmp_path / "ds", tmp_path)
    assert manifest.skipped == [
        {"index": 1, "file": "missing/b.png", "reason": "image file not found: missing/b.png"}]
