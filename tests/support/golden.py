"""The golden check: the exact bytes a fixed set of trainings produces, recorded once.

A refactor must not move a bit of what users get. This module trains three small tasks
(tiny-sd1; tiny-sd2 with v-prediction, min-SNR and noise offset; tiny-sdxl with a
text-encoder LoRA and random crop) in two segments each, publishes them, and hashes
every file a user or the next segment reads: checkpoint files, validation images and
the published folder.

``tests/data/golden.json`` holds the recorded hashes, one record per kind of machine: the
same code gives other bits on another CPU (measured: an AMD EPYC and the Intel Xeon the
first record came from differ in the VAE's latents already, with the same torch, MKL and
oneDNN builds and the same libraries), so a run passes when it equals the record of some
machine. Bits that match no record at all are a change. Two ways to write:

    OMP_NUM_THREADS=1 python -m tests.support.golden --write        # results meant to move
    OMP_NUM_THREADS=1 python -m tests.support.golden --add-machine  # a new kind of machine

``--write`` replaces every record with this machine's (the others are stale after a change
meant to move results: say so in the commit); ``--add-machine`` adds or replaces only the
record of this kind of machine, and is only right for code whose bits did not move.

Safetensors files are recorded twice: the whole file's sha256 and a hash of the tensors
alone (names, dtypes, shapes, bytes), so a change that only touches a file's metadata
can be told apart from one that moves a weight.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

GOLDEN_FILE = Path(__file__).resolve().parents[1] / "data" / "golden.json"

# Files whose bytes depend on the clock or the machine, not on the training: metrics and
# TensorBoard events (wall times), and the checkpoint manifest, which holds the sha256 of
# training_state.json (itself recorded below without its timing keys).
VOLATILE_NAMES = {"metrics.jsonl", "run_summary.json", "manifest.json"}
VOLATILE_PREFIXES = ("events.out.tfevents.", ".")
# Timing keys inside JSON files that are otherwise exact (the time box's measurements).
TIMING_KEYS = {"seconds", "seconds_per_step"}

TASKS: dict[str, dict[str, Any]] = {
    "tiny-sd1": {
        "model": {"name": "loraflow/tiny-sd1"},
        "dataset": {"name": "loraflow/demo-shapes"},
        "validation": {"num_images": 1, "num_inference_steps": 2},
        "train_args": {
            "learning_rate": 1e-3, "batch_size": 5, "gradient_accumulation_steps": 2,
            "scale_lr": False, "resolution": 64, "num_train_steps": 3, "max_train_steps": 6,
            "lr_scheduler": {"lr_scheduler": "cosine", "lr_warmup_steps": 2},
        },
        "lora": {"rank": 4, "alpha": 8, "init_lora_weights": "gaussian"},
        "transforms": {"center_crop": True, "random_flip": True},
        "seed": 7,
    },
    "tiny-sd2-v": {
        "model": {"name": "loraflow/tiny-sd2"},
        "dataset": {"name": "loraflow/demo-shapes"},
        "validation": {"num_images": 1, "num_inference_steps": 2},
        "train_args": {
            "learning_rate": 5e-4, "batch_size": 4, "scale_lr": False, "resolution": 64,
            "num_train_steps": 3, "max_train_steps": 6, "snr_gamma": 5.0,
            "noise_offset": 0.05,
            "lr_scheduler": {"lr_scheduler": "constant", "lr_warmup_steps": 0},
        },
        "lora": {"rank": 4},
        "transforms": {"center_crop": True, "random_flip": False},
        "seed": 3,
    },
    "tiny-sdxl-te": {
        "model": {"name": "loraflow/tiny-sdxl"},
        "dataset": {"name": "loraflow/demo-shapes"},
        "validation": {"num_images": 1, "num_inference_steps": 2},
        "train_args": {
            "learning_rate": 5e-4, "batch_size": 4, "scale_lr": False, "resolution": 64,
            "num_train_steps": 3, "max_train_steps": 6,
            "lr_scheduler": {"lr_scheduler": "cosine", "lr_warmup_steps": 1},
        },
        "lora": {"rank": 4, "alpha": 4, "text_encoder": {"rank": 2}},
        "transforms": {"center_crop": False, "random_flip": True},
        "seed": 11,
    },
}

RUN_SUMMARY = {
    "run_name": "golden",
    "started_at": "2026-01-01T00:00:00+00:00",
    "finished_at": "2026-01-01T01:00:00+00:00",
}


def tensors_digest(data: bytes) -> str:
    """sha256 over the tensors alone (sorted names, dtype, shape, raw bytes)."""
    from safetensors import safe_open

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        handle.write(data)
        handle.flush()
        digest = hashlib.sha256()
        with safe_open(handle.name, framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.view(-1).view(__import__("torch").uint8).numpy().tobytes())
        return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, dict[str, str]]:
    """{relative path: {"sha256": ..., ["tensors": ...]}} for every non-volatile file."""
    record: dict[str, dict[str, str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name in VOLATILE_NAMES or path.name.startswith(VOLATILE_PREFIXES):
            continue
        rel = path.relative_to(root).as_posix()
        if rel.startswith("cache/"):
            # The cache folder is named by a fingerprint of the model's location.
            rel = "cache/*/" + rel.split("/", 2)[2]
        data = path.read_bytes()
        if path.suffix == ".json":
            data = _without_timing(json.loads(data))
        entry = {"sha256": hashlib.sha256(data).hexdigest()}
        if path.suffix == ".safetensors":
            entry["tensors"] = tensors_digest(data)
        record[rel] = entry
    return record


def _without_timing(value: Any) -> bytes:
    """Canonical JSON of ``value`` with the :data:`TIMING_KEYS` dropped at any depth."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in TIMING_KEYS}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return json.dumps(strip(value), sort_keys=True).encode()


def train_and_publish(name: str, root: Path) -> Path:
    """Train ``TASKS[name]`` in segments under ``root``; publish; return the run folder."""
    from tests.support.golden_runner import run_golden_task

    return run_golden_task(TASKS[name], root)


def golden_record(workdir: Path) -> dict[str, dict[str, dict[str, str]]]:
    return {name: hash_tree(train_and_publish(name, workdir / name)) for name in TASKS}


def machine_kind() -> str:
    """What the bits depend on beyond the code: the CPU model, the kernels torch picks for it
    and torch's version (e.g. ``"AMD EPYC, AVX512, torch 2.13.0+cpu"``)."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def recorded() -> list[dict[str, Any]]:
    """The records of :data:`GOLDEN_FILE`: ``[{"machine": ..., "tasks": {name: hashes}}]``."""
    return json.loads(GOLDEN_FILE.read_text())["records"]


#: task name -> the machine whose record this session's run matched (None: none did);
#: filled by tests/test_golden.py and printed at the end of the run (tests/conftest.py),
#: so a CI log says which kind of machine it ran on.
MATCHED: dict[str, str | None] = {}


def matching_record(name: str, got: dict[str, dict[str, str]],
                    records: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(the machine whose record of task ``name`` equals ``got``, or None; what differs from
    the closest record, for the failure message)."""
    closest: tuple[int, str] | None = None
    for record in records:
        want = record["tasks"][name]
        if sorted(got) != sorted(want):
            difference = (f"{record['machine']}: other files than recorded: "
                          f"missing {sorted(set(want) - set(got))}, "
                          f"new {sorted(set(got) - set(want))}")
            count = len(set(want) ^ set(got)) + len(want)
        else:
            moved = sorted(path for path in want if got[path] != want[path])
            if not moved:
                return record["machine"], ""
            difference = f"{record['machine']}: files differ: {moved}"
            count = len(moved)
        if closest is None or count < closest[0]:
            closest = (count, difference)
    return None, closest[1] if closest else "no record"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="replace every record in tests/data/golden.json with this machine's")
    parser.add_argument("--add-machine", action="store_true",
                        help="add (or replace) only this kind of machine's record")
    parser.add_argument("--out", help="write this machine's record here instead")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="loraflow-golden-") as tmp:
        os.environ.setdefault("LORAFLOW_HOME", str(Path(tmp) / "home"))
        record = {"machine": machine_kind(), "tasks": golden_record(Path(tmp) / "runs")}
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if args.write or args.add_machine:
        others = [r for r in recorded() if r["machine"] != record["machine"]]
        records = [*others, record] if args.add_machine else [record]
        GOLDEN_FILE.write_text(json.dumps({"records": records}, indent=1, sort_keys=True) + "\n")
    elif args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
