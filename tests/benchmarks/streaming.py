"""Streaming webdataset shards: peak memory and local disk of a 50-step run, at two set sizes.

    python tests/benchmarks/streaming.py [--sizes 20000,40000] [--repeats 3] [--steps 50]
                                         [--json out.json]

A synthetic shard set (tiny PNGs + captions + a .json with a score, 1000 samples a shard,
written straight into tar shards) is put on the local SeaweedFS S3 server
(tests/support/s3_server.py). Each run is a fresh process that prepares the set (one
sequential pass over every shard, committing only the index into an empty local data
root) and trains ``--steps`` steps of tiny-sd1 at a small resolution without a latent
cache, so every step reads its images from S3 by ranged reads. Reported per size: the
median peak RSS of that process (``ru_maxrss``), the local disk it left (data root:
the index; nothing else is cached), the time to index and to train; then the ratio of
the largest size to the smallest. Not a test: a measurement for docs/performance.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PER_SHARD = 1000


def _png_variants(count: int = 16) -> list[bytes]:
    from PIL import Image

    out = []
    for k in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (32 + 8 * (k % 3), 32), (k * 16, 255 - k * 16, 90)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def _shard(first: int, count: int, images: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(first, first + count):
            key = f"{i:08d}"
            for ext, data in (("png", images[i % len(images)]),
                              ("txt", f"a shape, number {i}".encode()),
                              ("json", json.dumps({"score": i % 10}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_shard_set(fs, prefix: str, size: int) -> str:
    """``size`` samples in shards of PER_SHARD under ``prefix``; returns the brace pattern."""
    images = _png_variants()
    shards = (size + PER_SHARD - 1) // PER_SHARD
    for k in range(shards):
        count = min(PER_SHARD, size - k * PER_SHARD)
        fs.pipe_file(f"{prefix}/{k:04d}.tar", _shard(k * PER_SHARD, count, images))
    return f"s3://{prefix}/{{0000..{shards - 1:04d}}}.tar"


def child(pattern: str, steps: int, work: Path) -> dict:
    """One measured run (in its own process): index the shards, train ``steps`` steps."""
    from engine.data.prepared import prepare_for_task
    from engine.task.validation import validate_document
    from engine.train.segment import SegmentOptions, run_segment

    task = validate_document({
        "model": {"name": "loraflow/tiny-sd1"},
        "dataset": {"shards": [pattern],
                    "filters": [{"field": "score", "op": ">=", "value": 0}]},
        "train_args": {"learning_rate": 1e-3, "batch_size": 8, "resolution": 32,
                       "num_train_steps": steps, "max_train_steps": steps},
        "lora": {"rank": 4},
        "validation": {"num_images": 1, "num_inference_steps": 2},
        "seed": 1,
    })
    data_root = str(work / "datasets")
    started = time.monotonic()
    prepared = prepare_for_task(task, data_root)
    indexed = time.monotonic()
    result = run_segment(task, str(work / "out"), SegmentOptions(
        data_root=data_root, cache_root=None, validate=False))
    trained = time.monotonic()
    return {
        "count": prepared.count,
        "steps": result.global_step,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_root_mib": _du(work / "datasets") / 1024**2,
        "index_s": indexed - started,
        "train_s": trained - indexed,
    }


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,40000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("PATTERN", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.steps, Path(args.child[1]))))
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.support.s3_server import SeaweedS3

    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict = {
        "command": "python tests/benchmarks/streaming.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "sizes": {},
    }
    with SeaweedS3() as s3:
        fs = s3.filesystem()
        for size in sizes:
            t0 = time.monotonic()
            pattern = write_shard_set(fs, f"{s3.bucket}/bench-{size}", size)
            print(f"{size} samples written in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            runs = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="loraflow-stream-") as work:
                    out = subprocess.run(
                        [sys.executable, __file__, "--steps", str(args.steps), "--child",
                         pattern, work],
                        cwd=ROOT, capture_output=True, text=True, check=False,
                        env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                            "OMP_NUM_THREADS", "1")},
                    )
                if out.returncode != 0:
                    print(out.stderr[-4000:], file=sys.stderr)
                    return out.returncode
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(runs[-1], file=sys.stderr)
            report["sizes"][size] = {
                "shard_set_mib": sum(fs.du(f"{s3.bucket}/bench-{size}", total=False).values())
                / 1024**2,
                "runs": runs,
                **{f"median_{k}": statistics.median(r[k] for r in runs)
                   for k in ("peak_rss_mib", "data_root_mib", "index_s", "train_s")},
            }
    small, large = report["sizes"][sizes[0]], report["sizes"][sizes[-1]]
    report["ratio_peak_rss"] = large["median_peak_rss_mib"] / small["median_peak_rss_mib"]
    report["ratio_data_root"] = large["median_data_root_mib"] / small["median_data_root_mib"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
