"""Hostile input, end to end: task documents, dataset archives, images, pickles.

Unit tests elsewhere cover each guard on its own (tests/engine/task/test_definition.py,
tests/engine/data/test_archive.py, tests/engine/data/test_dataset.py,
tests/engine/infer/test_generate.py); here the damage
goes in where a user's input goes in, ``loraflow validate`` / ``loraflow segment`` /
``loraflow inspect`` and ``run_segment``, and the test checks what comes out: exit code 2,
a clear message, no traceback, nothing written where it must not be, nothing unpickled.

Why one module over 400 lines: one hostile input per test, end to end, in the order of
the README's reliability table; the unit tests of each guard live with their modules.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import pathlib
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from engine.data.errors import DatasetError
from engine.data.prepared import prepare_for_task
from engine.errors import ExitCode
from engine.model.loading import ModelLoadError, load_base_model
from engine.store.commit import commit_checkpoint, read_checkpoint
from engine.task.definition import TaskDefinition
from engine.train.segment import SegmentOptions, run_segment
from engine.train.state import OPTIMIZER_FILE
from tests.faults.fuzz_campaign import Case, cases, check_refusal, run_fuzz
from tests.support.engine import BASE_TASK, make_task

ROOT = Path(__file__).resolve().parents[2]
FUZZ_INPUTS = 2000
FUZZ_SEED = 20261123
LIGHT = {"train_args.batch_size": 1, "train_args.gradient_accumulation_steps": 1,
         "train_args.num_train_steps": 2, "train_args.max_train_steps": 2}


@contextlib.contextmanager
def saved_signal_handlers() -> Any:
    """``loraflow segment`` installs SIGTERM/SIGINT handlers; keep pytest's."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``flows.cli.main`` (what the ``loraflow`` script calls) in this process, captured."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with saved_signal_handlers(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def task_file(path: Path, **changes: Any) -> Path:
    doc = json.loads(json.dumps(BASE_TASK))
    for dotted, value in {**LIGHT, **changes}.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    path.write_text(json.dumps(doc))
    return path


# -- task definitions --------------------------------------------------------------------


def test_2000_malformed_task_documents_are_all_refused_with_pointers_and_exit_2(
    tmp_path: Path,
) -> None:
    """See tests/faults/fuzz_campaign.py for how documents are damaged and what is checked
    (unknown keys with "/" and "~" included: their pointers must be escaped)."""
    result = run_fuzz(FUZZ_INPUTS, FUZZ_SEED, tmp_path)
    print(json.dumps({k: v for k, v in vars(result).items() if k != "examples"}))
    assert result.inputs_tried == FUZZ_INPUTS
    assert result.failures == 0, json.dumps(result.examples, indent=2)[:4000]
    assert len(result.by_kind) >= 15  # every kind of damage was tried


def _lone_surrogate_key() -> Case:
    text = json.dumps({**BASE_TASK, "\ud800bogus": 1}, ensure_ascii=True)
    return Case("lone-surrogate-key", text.encode(), None)


@pytest.mark.timeout(180)
def test_malformed_documents_in_real_cli_processes_exit_2_without_traceback(
    tmp_path: Path,
) -> None:
    """A handful through separate ``loraflow`` processes: real stderr encoding (a lone
    surrogate in a key), real exit status; ``segment`` refuses before any training."""
    picked = [c for c in cases(60, FUZZ_SEED + 1) if c.kind in {
        "wrong-value", "syntax-truncate", "bad-encoding", "too-deep", "huge-number"}]
    chosen = {c.kind: c for c in picked}  # one of each kind
    runs = [("validate", c) for c in chosen.values()]
    runs += [("validate", _lone_surrogate_key()), ("segment", next(iter(chosen.values())))]
    for i, (command, case) in enumerate(runs):
        path = tmp_path / f"case{i}.json"
        path.write_bytes(case.data)
        args = [command, str(path)]
        if command == "segment":
            args += ["--output-dir", str(tmp_path / "out"), "--no-validation"]
        done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                              cwd=ROOT, timeout=120)
        stderr = done.stderr.decode("utf-8", "backslashreplace")
        outcome = check_refusal(case, done.returncode, done.stdout.decode(), stderr)
        assert outcome.ok, f"{command} {case.kind}: {outcome.problem}\n{stderr[-2000:]}"
    assert not (tmp_path / "out").exists()


def test_unknown_key_with_slash_or_tilde_is_reported_at_an_escaped_json_pointer(
    tmp_path: Path,
) -> None:
    """RFC 6901: "~" is written "~0" and "/" is written "~1" inside a pointer."""
    doc = {**BASE_TASK, "train_args": {**BASE_TASK["train_args"], "a/b~c": 1}}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(doc))
    code, _, stderr = run_cli(["validate", str(path)])
    assert code == ExitCode.BAD_INPUT
    assert "  /train_args/a~1b~0c: unknown field" in stderr


# -- dataset archives (dataset.url) ------------------------------------------------------


def _png(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _metadata(names: list[str]) -> bytes:
    return "".join(json.dumps({"file_name": n, "text": f"shape {n}"}) + "\n"
                   for n in names).encode()


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def _good_entries() -> list[tuple[zipfile.ZipInfo | str, bytes]]:
    return [("a.png", _png()), ("metadata.jsonl", _metadata(["a.png"]))]


def _tar(path: Path, special: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in [("a.png", _png()), ("metadata.jsonl", _metadata(["a.png"]))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        tf.addfile(special)
    return path


def _tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _zip_with_mode(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: external_attr carries st_mode
    info.external_attr = mode << 16
    return info


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _zeros_member() -> bytes:
    return bytes(64 << 20)  # 64 MiB of zeros deflate to ~64 KiB: ratio ~1000


ESCAPE = f"evil-{uuid.uuid4().hex[:8]}"
HOSTILE_ARCHIVES: dict[str, tuple[Any, str]] = {
    "zip-slip": (lambda p: _zip(p, [*_good_entries(), (f"../../{ESCAPE}.png", _png())]),
                 "member"),
    "absolute-path": (lambda p: _zip(p, [*_good_entries(), (f"/tmp/{ESCAPE}.png", _png())]),
                      "member"),
    "zip-symlink": (lambda p: _zip(p, [*_good_entries(), (
        _zip_with_mode(f"{ESCAPE}-link", stat.S_IFLNK | 0o777), b"/etc/passwd")]),
        "symbolic link"),
    "zip-device": (lambda p: _zip(p, [*_good_entries(), (
        _zip_with_mode(f"{ESCAPE}-dev", stat.S_IFCHR | 0o666), b"")]), "special file"),
    "tar-symlink": (lambda p: _tar(p, _tar_special(f"{ESCAPE}-link", tarfile.SYMTYPE,
                                                  "/etc/passwd")), "symbolic link"),
    "tar-hardlink": (lambda p: _tar(p, _tar_special(f"{ESCAPE}-hard", tarfile.LNKTYPE,
                                                   "a.png")), "hard link"),
    "tar-device": (lambda p: _tar(p, _tar_special(f"{ESCAPE}-dev", tarfile.CHRTYPE)),
                   "device"),
    "zip-bomb": (lambda p: _zip(p, [*_good_entries(), ("zeros.bin", _zeros_member())]),
                 "compression ratio"),
    "wrong-magic": (lambda p: _write(p, _png() * 4), "not a zip or tar archive"),
}


def _nothing_escaped(*roots: Path) -> list[Path]:
    found = [p for root in roots for p in root.rglob(f"*{ESCAPE}*")]
    return found + [p for p in Path("/tmp").glob(f"{ESCAPE}*")]


@pytest.mark.parametrize("kind", list(HOSTILE_ARCHIVES))
def test_hostile_archive_url_is_refused_by_loraflow_segment_and_nothing_is_written(
    tmp_path: Path, kind: str
) -> None:
    build, problem = HOSTILE_ARCHIVES[kind]
    (tmp_path / "in").mkdir()
    archive = build(tmp_path / "in" / "dataset.zip")
    task = task_file(tmp_path / "task.json", **{"dataset.name": None,
                                                "dataset.url": archive.as_uri()})
    data_dir, out = tmp_path / "data", tmp_path / "out"
    code, stdout, stderr = run_cli(["segment", str(task), "--output-dir", str(out),
                                    "--data-dir", str(data_dir), "--no-validation"])
    assert code == ExitCode.BAD_INPUT, stderr
    assert stderr.startswith("error: ") and problem in stderr and "Traceback" not in stderr
    assert stdout == "" and not out.exists()
    assert not list(data_dir.rglob("manifest.json"))  # no dataset was committed
    assert _nothing_escaped(tmp_path) == []


def test_nested_archive_is_not_unpacked_and_leaves_no_usable_image(tmp_path: Path) -> None:
    inner = _zip(tmp_path / "inner.zip", _good_entries()).read_bytes()
    archive = _zip(tmp_path / "outer.zip", [("inner.zip", inner), ("readme.txt", b"hi")])
    task = make_task(**{"dataset.name": None, "dataset.url": archive.as_uri()})
    with pytest.raises(DatasetError) as info:
        prepare_for_task(task, str(tmp_path / "data"))
    print(info.value)
    assert not list((tmp_path / "data").rglob("*.png"))


@pytest.mark.timeout(180)
def test_zip_slip_through_a_real_loraflow_segment_process_exits_2(tmp_path: Path) -> None:
    archive = HOSTILE_ARCHIVES["zip-slip"][0](tmp_path / "slip.zip")
    task = task_file(tmp_path / "task.json", **{"dataset.name": None,
                                                "dataset.url": archive.as_uri()})
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "segment", str(task), "--output-dir",
         str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), "--no-validation"],
        capture_output=True, text=True, cwd=ROOT, timeout=150,
    )
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr[-3000:]
    assert "error: " in done.stderr and "Traceback" not in done.stderr
    assert _nothing_escaped(tmp_path) == []


# -- images ------------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 1 << 20) + b"IDAT")


def _hostile_images() -> list[tuple[str, bytes, str | None]]:
    """(file name, bytes, expected skip reason or None when it must be converted)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    palette = Image.new("P", (24, 24), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (12, 0, 24, 24))
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    sixteen = Image.new("I;16", (24, 24))
    return [
        ("good-1.png", _png((40, 32), (10, 200, 10)), None),
        ("truncated.png", _png((64, 64))[:70], "unreadable"),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20, "unreadable"),
        ("empty.png", b"", "empty"),
        ("bomb.png", _png_header_claiming(100_000, 100_000), "too large"),
        ("cmyk.jpg", _encoded(Image.new("CMYK", (24, 24), (0, 90, 0, 0)), "JPEG"), None),
        ("sixteen-bit.png", _encoded(sixteen, "PNG"), None),
        ("palette-alpha.png", _encoded(palette, "PNG", transparency=0), None),
        ("exif-rotated.jpg", _encoded(Image.new("RGB", (40, 24), (0, 128, 0)), "JPEG",
                                      exif=exif.tobytes()), None),
        ("animated.gif", _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
         None),
        ("one-pixel.png", _png((1, 1)), "too small"),
        ("huge.png", _encoded(Image.new("1", (8200, 8200)), "PNG"), "too large"),
        ("png-named.jpg", _png((32, 32), (0, 0, 200)), None),
        ("good-2.png", _png((24, 40), (200, 200, 10)), None),
    ]


def test_hostile_images_are_converted_or_skipped_with_a_reason_each_and_training_runs(
    tmp_path: Path,
) -> None:
    images = _hostile_images()
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data, _ in images:
        (folder / name).write_bytes(data)
    (folder / "metadata.jsonl").write_bytes(_metadata([n for n, _, _ in images]))
    task = make_task(**{**LIGHT, "dataset.name": str(folder)})

    result = run_segment(task, str(tmp_path / "out"), SegmentOptions(
        validate=False, data_root=str(tmp_path / "data")))
    assert result.finished and result.global_step == 2

    # the per-file report: in the segment's summary (the `loraflow segment` JSON line)...
    summary = json.loads(result.to_json())
    skipped = {images[s["index"]][0]: s["reason"] for s in summary["skipped_images"]}
    expected = {name: reason for name, _, reason in images if reason is not None}
    assert sorted(skipped) == sorted(expected)
    for name, reason in expected.items():
        assert reason in skipped[name], (name, skipped[name])
    # ... and in the prepared dataset's manifest, which holds the images that were kept
    manifest = prepare_for_task(task, str(tmp_path / "data"))  # committed: found, not redone
    assert manifest.skipped == summary["skipped_images"]
    assert manifest.count == len(images) - len(expected)
    print(json.dumps(manifest.skipped, indent=1))


def _folder(root: Path, rows: list[dict[str, Any]], files: dict[str, bytes]) -> Path:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


UNUSABLE_DATASETS: dict[str, tuple[dict[str, Any], dict[str, bytes], dict[str, str], str]] = {
    "no-usable-image": ([{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}],
                        {"a.png": b"", "b.png": b"junk" * 9}, {}, "no usable image"),
    "missing-image-column": ([{"file_name": "a.png", "text": "x"}], {"a.png": _png()},
                             {"dataset.image_column": "picture"}, "'picture'"),
    "missing-caption-column": ([{"file_name": "a.png", "text": "x"}], {"a.png": _png()},
                               {"dataset.caption_column": "caption"}, "'caption'"),
    "empty-captions": ([{"file_name": "a.png", "text": ""}, {"file_name": "b.png", "text": " "}],
                       {"a.png": _png(), "b.png": _png()}, {}, "no non-empty caption"),
}


@pytest.mark.parametrize("kind", list(UNUSABLE_DATASETS))
def test_unusable_dataset_is_refused_by_loraflow_segment_before_the_model_loads(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, files, changes, problem = UNUSABLE_DATASETS[kind]
    folder = _folder(tmp_path / "src", rows, files)

    def must_not_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded: the dataset was not checked first")

    monkeypatch.setattr("engine.train.segment.load_base_model", must_not_load)
    task = task_file(tmp_path / "task.json", **{"dataset.name": str(folder), **changes})
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["segment", str(task), "--output-dir", str(out),
                                    "--data-dir", str(tmp_path / "data"), "--no-validation"])
    assert code == ExitCode.BAD_INPUT, stderr
    assert stderr.startswith("error: ") and problem in stderr and "Traceback" not in stderr
    assert stdout == "" and not out.exists()


# -- pickles -----------------------------------------------------------------------------


class _Payload:
    """Unpickling this writes ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "unpickled"))


def _pickle_file(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state": _Payload(marker), "lora_unet_x.lora_down.weight": torch.zeros(2)},
               buffer)
    return buffer.getvalue()


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """Control: unpickling it does run code, so the tests below mean something."""
    marker = tmp_path / "marker"
    torch.load(io.BytesIO(_pickle_file(marker)), weights_only=False)
    assert marker.read_text() == "unpickled"


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> tuple[TaskDefinition, Path]:
    """A committed 1-step checkpoint of a 2-step task."""
    root = tmp_path_factory.mktemp("pickle")
    task = make_task(**{**LIGHT, "train_args.num_train_steps": 1})
    result = run_segment(task, str(root / "s0"), SegmentOptions(validate=False))
    return task, Path(result.checkpoint)


def test_pickles_planted_beside_a_checkpoint_are_never_loaded(
    committed: tuple[TaskDefinition, Path], tmp_path: Path
) -> None:
    task, source = committed
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(source, checkpoint)
    marker = tmp_path / "marker"
    for name in ("optimizer.pt", "pytorch_model.bin", "training_state.pkl", "scheduler.bin"):
        (checkpoint / name).write_bytes(_pickle_file(marker))
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    result = run_segment(task, str(tmp_path / "s1"), SegmentOptions(
        checkpoint=str(checkpoint), validate=False))
    assert result.finished and not marker.exists()


def test_a_pickle_in_place_of_the_optimizer_file_is_refused_unopened(
    committed: tuple[TaskDefinition, Path], tmp_path: Path
) -> None:
    task, source = committed
    marker = tmp_path / "marker"
    swapped = tmp_path / "swapped"
    shutil.copytree(source, swapped)
    (swapped / OPTIMIZER_FILE).write_bytes(_pickle_file(marker))  # the manifest catches it
    code, _, stderr = run_cli(["segment", str(task_file(tmp_path / "t.json", **{
        "train_args.num_train_steps": 1})), "--output-dir", str(tmp_path / "o1"),
        "--checkpoint", str(swapped), "--no-validation"])
    assert code == ExitCode.BAD_INPUT, stderr
    assert f"is corrupt: {OPTIMIZER_FILE}" in stderr and "Traceback" not in stderr
    assert not marker.exists()

    # an attacker who can write the folder can also write a consistent manifest
    loaded = read_checkpoint(str(source))
    forged = tmp_path / "forged"
    meta = {k: v for k, v in loaded.manifest.items() if k not in ("format", "files",
                                                                  "manifest_sha256")}
    commit_checkpoint(str(forged), {**loaded.files, OPTIMIZER_FILE: _pickle_file(marker)},
                      meta=meta)
    with pytest.raises(Exception) as info:  # noqa: PT011 - any refusal, as long as unopened
        run_segment(task, str(tmp_path / "o2"), SegmentOptions(checkpoint=str(forged),
                                                               validate=False))
    print(f"forged checkpoint refused: {type(info.value).__name__}: {info.value}")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_pickle_lora_files_are_refused_by_loraflow_inspect_and_generate_unopened(
    tmp_path: Path, command: str, tiny_sd1: str
) -> None:
    marker = tmp_path / "marker"
    for name in ("lora.bin", "lora.pt", "lora.safetensors"):  # the last one is disguised
        lora = tmp_path / name
        lora.write_bytes(_pickle_file(marker))
        argv = (["inspect", str(lora)] if command == "inspect" else
                ["generate", "--model", tiny_sd1, "--lora", str(lora), "--prompt", "x",
                 "--steps", "1", "--output-dir", str(tmp_path / "images")])
        code, stdout, stderr = run_cli(argv)
        assert code == ExitCode.BAD_INPUT, (name, stderr)
        assert stderr.startswith("error: ") and "pickle" in stderr
        assert "Traceback" not in stderr and stdout == ""
    assert not marker.exists() and not (tmp_path / "images").exists()


def test_a_model_folder_with_only_pickle_weights_is_refused_unopened(
    tiny_sd1: str, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1, model)
    marker = tmp_path / "marker"
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(_pickle_file(marker))
    task = make_task(**{"model.name": str(model)})
    with pytest.raises(ModelLoadError, match="unet"):
        load_base_model(task, torch.device("cpu"))
    assert not marker.exists()


UNSAFE_CALLS = {
    ("torch", "load"): "weights_only=True",
    ("pickle", "load"): None, ("pickle", "loads"): None, ("pickle", "Unpickler"): None,
    ("dill", "load"): None, ("dill", "loads"): None, ("joblib", "load"): None,
    ("cloudpickle", "load"): None, ("cloudpickle", "loads"): None,
    ("pandas", "read_pickle"): None, ("pd", "read_pickle"): None,
    ("numpy", "load"): "allow_pickle=False", ("np", "load"): "allow_pickle=False",
    ("marshal", "loads"): None, ("shelve", "open"): None,
}


def _unsafe_calls(path: Path) -> list[str]:
    """Calls that can unpickle, unless made safe by their keyword (see UNSAFE_CALLS)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, tuple[str, str]] = {}  # from torch import load as tl -> tl
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = (node.module.split(".")[0], alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            key = (func.value.id, func.attr)
        elif isinstance(func, ast.Name) and func.id in aliases:
            key = aliases[func.id]
        else:
            continue
        if key not in UNSAFE_CALLS:
            continue
        required = UNSAFE_CALLS[key]
        if required is not None:
            name, value = required.split("=")
            safe = any(k.arg == name and isinstance(k.value, ast.Constant)
                       and k.value.value == (value == "True") for k in node.keywords)
            if safe:
                continue
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        found.append(f"{where}:{node.lineno}: {'.'.join(key)}(...)")
    return found


def test_nothing_in_engine_tasks_or_flows_can_unpickle() -> None:
    """torch.load only with weights_only=True, numpy.load only with allow_pickle=False, and
    no pickle/dill/joblib/marshal/shelve loads at all."""
    sources = [p for folder in ("engine", "tasks", "flows") for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 30
    assert [call for path in sources for call in _unsafe_calls(path)] == []


def test_the_unpickling_check_catches_what_it_looks_for(tmp_path: Path) -> None:
    """Control for the check above, on a file written to trip it."""
    sample = tmp_path / "unsafe_sample.py"
    sample.write_text(
        "import torch, pickle\nfrom torch import load as tl\nimport numpy as np\n"
        "torch.load('a')\ntorch.load('b', weights_only=False)\ntl('c')\npickle.loads(b'')\n"
        "np.load('d', allow_pickle=True)\ntorch.load('ok', weights_only=True)\n"
    )
    found = _unsafe_calls(sample)
    assert sorted(f.rsplit(": ", 1)[1] for f in found) == [
        "np.load(...)", "pickle.loads(...)", "torch.load(...)", "torch.load(...)",
        "torch.load(...)"]
