"""Engine benchmark: cache speed-up and the cost of splitting training into segments.

    python tests/benchmarks/bench_engine.py [--repeats 3] [--steps 200] [--out bench.json]

Measures, on the embedded tiny-sd1 at 64 px, batch 4 (CPU unless a GPU is present):
- training samples/s from the caption/latent cache vs encoding every step (median of the
  per-step rates after the first 5 steps, median over repeats);
- segment overhead ratio = time(4 segments x steps/4, each loading the model and the
  previous checkpoint afresh, in one process) / time(1 segment x steps).
Prints a markdown table and writes JSON. Not a test: run it by hand, quote medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.logs import silence_progress_bars  # noqa: E402
from engine.task.validation import validate_document  # noqa: E402
from engine.train.segment import SegmentOptions, run_segment  # noqa: E402

TASK = {
    "model": {"name": "loraflow/tiny-sd1"},
    "dataset": {"name": "loraflow/demo-shapes"},
    "validation": {"num_images": 1, "num_inference_steps": 2},
    "train_args": {"learning_rate": 1e-4, "batch_size": 4, "scale_lr": False, "resolution": 64,
                   "lr_scheduler": {"lr_scheduler": "constant", "lr_warmup_steps": 0}},
    "lora": {"rank": 4},
    "transforms": {"center_crop": True, "random_flip": True},
    "seed": 0,
}


def task_with(steps_per_segment: int, total: int):
    doc = json.loads(json.dumps(TASK))
    doc["train_args"].update({"num_train_steps": steps_per_segment, "max_train_steps": total})
    return validate_document(doc)


def steady_rate(metrics_url: str) -> float:
    records = [json.loads(line) for line in Path(metrics_url).read_text().splitlines()]
    return statistics.median(r["samples_per_second"] for r in records[5:])


def chain_seconds(task, root: Path, cache: str) -> float:
    """Wall time of running ``task`` to FINISH, each segment a fresh run_segment call."""
    t0, checkpoint = time.perf_counter(), None
    for i in range(100):
        opts = SegmentOptions(checkpoint=checkpoint, cache_root=cache, validate=False)
        result = run_segment(task, str(root / f"s{i}"), opts)
        checkpoint = result.checkpoint
        if result.finished:
            return time.perf_counter() - t0
    raise RuntimeError("no FINISH")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="bench-engine.json")
    args = parser.parse_args()
    silence_progress_bars()
    os.environ.setdefault("LORAFLOW_HOME", tempfile.mkdtemp(prefix="loraflow-bench-home-"))

    cached, live, one, four = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = str(root / "cache")
        run_segment(task_with(10, 10), str(root / "warm"),
                    SegmentOptions(cache_root=cache, validate=False))
        for r in range(args.repeats):
            short = task_with(40, 40)
            res = run_segment(short, str(root / f"c{r}"),
                              SegmentOptions(cache_root=cache, validate=False))
            cached.append(steady_rate(res.metrics))
            res = run_segment(short, str(root / f"l{r}"),
                              SegmentOptions(cache_root=None, validate=False))
            live.append(steady_rate(res.metrics))
            one.append(chain_seconds(task_with(args.steps, args.steps), root / f"one{r}", cache))
            quarter = task_with(args.steps // 4, args.steps)
            four.append(chain_seconds(quarter, root / f"four{r}", cache))

    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python tests/benchmarks/bench_engine.py " + " ".join(sys.argv[1:]),
        "samples_per_s_cached": statistics.median(cached),
        "samples_per_s_live": statistics.median(live),
        "cache_speedup": statistics.median(cached) / statistics.median(live),
        "seconds_1x_steps": statistics.median(one),
        "seconds_4_segments": statistics.median(four),
        "segment_overhead_ratio": statistics.median(four) / statistics.median(one),
        "repeats": args.repeats,
        "steps": args.steps,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| measure | median |\n|---|---|")
    print(f"| samples/s, from the cache | {result['samples_per_s_cached']:.1f} |")
    print(f"| samples/s, encoding every step | {result['samples_per_s_live']:.1f} |")
    print(f"| cache speed-up | {result['cache_speedup']:.2f}x |")
    print(f"| 1 segment x {args.steps} steps | {result['seconds_1x_steps']:.2f} s |")
    print(f"| 4 segments x {args.steps // 4} steps | {result['seconds_4_segments']:.2f} s |")
    print(f"| segment overhead ratio | {result['segment_overhead_ratio']:.3f} |")


if __name__ == "__main__":
    main()
