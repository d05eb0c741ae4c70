"""engine.data.archive_members and archive_extract: safe extraction of untrusted dataset
archives (fetching them: tests/engine/data/test_archive_fetch.py)."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from engine.data.archive_extract import dataset_root, extract
from engine.data.archive_members import detect_format
from engine.data.errors import ArchiveError
from tests.support.datasets import FILES, make_zip

# -- builders ----------------------------------------------------------------------------




def make_tar(path: Path, files: dict[str, bytes], compression: str = "") -> Path:
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_tar_entry(path: Path, info: tarfile.TarInfo) -> Path:
    """A tar holding one ordinary file and the special entry ``info``."""
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        tf.addfile(info)
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Parent folder of the extraction destination, empty at the start."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def assert_left_nothing(tmp_path: Path, out: Path) -> None:
    """After a refusal: no destination, no temporary folder, no escaped file anywhere."""
    assert list(out.iterdir()) == []
    escaped = [p for p in tmp_path.rglob("*evil*")]
    assert escaped == []


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- good archives -----------------------------------------------------------------------


def test_zip_extracts_all_files_into_dest(tmp_path: Path, out: Path) -> None:
    archive = make_zip(tmp_path / "good.zip", FILES)
    dest = extract(archive, out / "dest")
    assert dest == out / "dest"
    assert read_tree(dest) == FILES
    assert [p.name for p in out.iterdir()] == ["dest"]  # no temporary folder left


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_tar_and_compressed_tars_extract(tmp_path: Path, out: Path, compression: str) -> None:
    archive = make_tar(tmp_path / f"good.tar.{compression}", FILES, compression)
    assert read_tree(extract(archive, out / "dest")) == FILES


def test_format_is_detected_by_magic_bytes_not_by_extension(tmp_path: Path, out: Path) -> None:
    archive = make_tar(tmp_path / "really-a-tar-gz.zip", FILES, "gz")
    assert detect_format(archive) == "gzip"
    assert read_tree(extract(archive, out / "dest")) == FILES


def test_extracted_files_get_plain_permissions(tmp_path: Path, out: Path) -> None:
    archive = tmp_path / "setuid.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("tool")
        info.size, info.mode = 1, 0o4777
        tf.addfile(info, io.BytesIO(b"x"))
    dest = extract(archive, out / "dest")
    assert (dest / "tool").stat().st_mode & 0o7777 == 0o644


def test_nested_archive_is_kept_as_a_file_not_extracted(tmp_path: Path, out: Path) -> None:
    inner = make_zip(tmp_path / "inner.zip", {"secret.txt": b"inside"}).read_bytes()
    archive = make_zip(tmp_path / "outer.zip", {"data/inner.zip": inner, "x.txt": b"x"})
    dest = extract(archive, out / "dest")
    assert read_tree(dest) == {"data/inner.zip": inner, "x.txt": b"x"}


def test_macos_junk_is_skipped(tmp_path: Path, out: Path) -> None:
    archive = make_zip(
        tmp_path / "mac.zip",
        {"d/a.txt": b"a", "__MACOSX/d/._a.txt": b"junk", "d/.DS_Store": b"junk"},
    )
    assert read_tree(extract(archive, out / "dest")) == {"d/a.txt": b"a"}


def test_dataset_root_steps_into_a_lone_top_folder(tmp_path: Path, out: Path) -> None:
    archive = make_zip(
        tmp_path / "wrapped.zip", {"wrap/inner/a.txt": b"a", "wrap/inner/b.txt": b"b"}
    )
    dest = extract(archive, out / "dest")
    assert dataset_root(dest) == dest / "wrap" / "inner"
    flat = extract(make_zip(tmp_path / "flat.zip", FILES), out / "flat")
    assert dataset_root(flat) == flat


# -- refused archives: nothing may be written --------------------------------------------


def test_wrong_magic_is_refused(tmp_path: Path, out: Path) -> None:
    not_archive = tmp_path / "data.zip"
    not_archive.write_bytes(b"just some text, not an archive" * 40)
    with pytest.raises(ArchiveError, match="not a zip or tar archive"):
        extract(not_archive, out / "dest")
    assert_left_nothing(tmp_path, out)


def test_gzip_of_something_else_is_refused(tmp_path: Path, out: Path) -> None:
    import gzip

    archive = tmp_path / "text.gz"
    archive.write_bytes(gzip.compress(b"hello " * 200))
    with pytest.raises(ArchiveError, match="not a zip or tar archive"):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


ESCAPING_NAMES = [
    "../evil.txt",
    "a/../../evil.txt",
    "/tmp/evil.txt",
    "C:/evil.txt",
    "..\\evil.txt",
    "a\\..\\..\\evil.txt",
]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_zip_member_escaping_dest_is_refused(tmp_path: Path, out: Path, name: str) -> None:
    archive = make_zip(tmp_path / "slip.zip", {"fine.txt": b"ok", name: b"pwned"})
    with pytest.raises(ArchiveError, match="member"):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_tar_member_escaping_dest_is_refused(tmp_path: Path, out: Path, name: str) -> None:
    archive = make_tar(tmp_path / "slip.tar.gz", {"fine.txt": b"ok", name: b"pwned"}, "gz")
    with pytest.raises(ArchiveError, match="member"):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("info", "problem"),
    [
        (_special("evil-link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (_special("evil-rel-link", tarfile.SYMTYPE, "ok.txt"), "symbolic link"),
        (_special("evil-hard", tarfile.LNKTYPE, "ok.txt"), "hard link"),
        (_special("evil-chr", tarfile.CHRTYPE), "device"),
        (_special("evil-blk", tarfile.BLKTYPE), "device"),
        (_special("evil-fifo", tarfile.FIFOTYPE), "FIFO"),
    ],
    ids=["symlink-abs", "symlink-rel", "hardlink", "chardev", "blockdev", "fifo"],
)
def test_tar_links_and_special_files_are_refused(
    tmp_path: Path, out: Path, info: tarfile.TarInfo, problem: str
) -> None:
    archive = make_tar_entry(tmp_path / "special.tar", info)
    with pytest.raises(ArchiveError, match=problem):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


def test_zip_symlink_is_refused(tmp_path: Path, out: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        link = zipfile.ZipInfo("evil-link")
        link.create_system = 3
        link.external_attr = 0o120777 << 16  # S_IFLNK
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


def test_duplicate_member_is_refused(tmp_path: Path, out: Path) -> None:
    archive = make_tar(tmp_path / "dup.tar", {"a.txt": b"1", "./a.txt": b"2"})
    with pytest.raises(ArchiveError, match="twice"):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


def _zeros_zip(path: Path, size: int) -> Path:
    """A zip with one deflated member of ``size`` zero bytes, written in a stream."""
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("zeros.bin")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
    return path


def test_zip_bomb_by_compression_ratio_is_refused(tmp_path: Path, out: Path) -> None:
    archive = _zeros_zip(tmp_path / "bomb.zip", 64 << 20)  # 64 MiB -> ~64 KiB: ratio ~1000
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(ArchiveError, match="compression ratio"):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


def test_zip_bomb_by_total_size_is_refused(tmp_path: Path, out: Path) -> None:
    archive = make_zip(
        tmp_path / "big.zip", {f"f{i}.bin": bytes(range(256)) * 40 for i in range(10)}
    )
    with pytest.raises(ArchiveError, match="total uncompressed size"):
        extract(archive, out / "dest", max_total_bytes=50_000)
    assert_left_nothing(tmp_path, out)


def test_tar_gz_bomb_is_stopped_while_scanning(tmp_path: Path, out: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 64 << 20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(ArchiveError, match="compression ratio"):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


def test_zip_header_understating_a_size_is_refused(tmp_path: Path, out: Path) -> None:
    """Headers can lie: the bytes really produced are what counts."""
    archive = make_zip(tmp_path / "liar.zip", {"payload.bin": bytes(range(256)) * 400})
    raw = bytearray(archive.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, 100)  # uncompressed size in the local header
    struct.pack_into("<I", raw, central + 24, 100)  # ... and in the central directory
    archive.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_members_is_refused(tmp_path: Path, out: Path, kind: str) -> None:
    files = {f"f{i}.txt": b"x" for i in range(5)}
    archive = (make_zip if kind == "zip" else make_tar)(tmp_path / f"many.{kind}", files)
    with pytest.raises(ArchiveError, match="more than 3 members"):
        extract(archive, out / "dest", max_members=3)
    assert_left_nothing(tmp_path, out)


def test_truncated_archive_is_refused_and_leaves_nothing(tmp_path: Path, out: Path) -> None:
    archive = make_tar(tmp_path / "cut.tar.gz", {"a.bin": bytes(range(256)) * 4000}, "gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ArchiveError):
        extract(archive, out / "dest")
    assert_left_nothing(tmp_path, out)


def test_existing_non_empty_dest_is_refused(tmp_path: Path, out: Path) -> None:
    (out / "dest").mkdir()
    (out / "dest" / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="not empty"):
        extract(make_zip(tmp_path / "a.zip", FILES), out / "dest")
    assert (out / "dest" / "keep.txt").read_text() == "mine"
