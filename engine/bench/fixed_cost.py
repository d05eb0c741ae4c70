"""The fixed cost of a ``loraflow segment`` process, phase by phase, every process cold.

Why: a segment pays its start-up (interpreter, imports, task and reference checks,
dataset verification, model loading, adapter set-up, cache opening) and its end
(checkpoint save, metrics flush, exit) once per process; a run of many short segments
pays it many times. Each repeat here starts a fresh Python process that runs the real
command line (``flows.cli.main.main(["segment", ...])``) with the phases of
:mod:`engine.train.phases` recorded, so what is timed is what a node runs. The phases
are marked in the code that does the work (segment.py, flows/cli/train.py).

Beside the phases it reports, per process: interpreter start (spawn to the first line
of Python), the CLI's own imports, exit (the command's return to the process's end),
and the whole process. Medians over the repeats; processes interleave the variants
(cache on, cache off), so a load that comes and goes on the machine hits both alike.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The issue-18 work: tiny-sd1, the demo shapes, 64 px, center crop, batch 4, rank 4
#: (alpha 4) on to_q/to_k/to_v/to_out.0, constant lr 1e-4, AdamW defaults, seed 1, fp32.
PEER_TASK: dict[str, Any] = {
    "model": {"name": "loraflow/tiny-sd1"},
    "dataset": {"name": "loraflow/demo-shapes"},
    "validation": {"num_images": 1},
    "train_args": {
        "learning_rate": 1e-4, "batch_size": 4, "gradient_accumulation_steps": 1,
        "scale_lr": False, "resolution": 64, "num_train_steps": 200, "max_train_steps": 200,
        "max_train_epochs": 100,
        "lr_scheduler": {"lr_scheduler": "constant", "lr_warmup_steps": 0},
    },
    "lora": {"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
    "transforms": {"center_crop": True, "random_flip": False},
    "mixed_precision": "no",
    "seed": 1,
}

# The child: time its first line, import the CLI, run the command with phases recorded.
# (The child process is the command line itself; the engine never imports the CLI.)
_CHILD = """
import time
first_line = time.time()
import importlib, json, sys
main = importlib.import_module("flows.cli.main").main
from engine.train.phases import recording
imported = time.time()
with recording() as log:
    code = main(sys.argv[2:])
returned = time.time()
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "first_line": first_line, "imported": imported,
               "returned": returned, "phases": log.seconds}, out)
"""

#: The checkout whose code the measured processes run (this one, not an installed copy).
CODE_ROOT = Path(__file__).resolve().parents[2]
#: Phases that are not fixed cost (they grow with the steps).
STEP_PHASES = ("training steps",)


def segment_command(task_file: str, output_dir: str, *, cache_dir: str | None, steps: int,
                    extra: list[str] | None = None) -> list[str]:
    """The ``loraflow segment`` arguments of one process (no validation, quiet)."""
    args = ["segment", task_file, "--output-dir", output_dir, "--no-validation", "-q",
            f"train_args.num_train_steps={steps}", f"train_args.max_train_steps={steps}"]
    args += ["--cache-dir", cache_dir] if cache_dir else ["--no-cache"]
    return args + list(extra or [])


def time_process(args: list[str], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """One cold process: spawn, run ``args`` through the CLI, return its timings."""
    record = workdir / f"phases-{time.monotonic_ns()}.json"
    spawned = time.time()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(record), *args], env=env,
                          cwd=CODE_ROOT, capture_output=True, text=True, check=False)
    ended = time.time()
    if done.returncode != 0 or not record.exists():
        raise RuntimeError(f"loraflow {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stderr[-2000:]}")
    child = json.loads(record.read_text())
    record.unlink()
    timings = {"interpreter start": child["first_line"] - spawned,
               "imports: the CLI": child["imported"] - child["first_line"]}
    timings |= child["phases"]
    timings["exit"] = ended - child["returned"]
    timings["whole process"] = ended - spawned
    timings["other (between phases)"] = timings["whole process"] - sum(
        seconds for name, seconds in timings.items() if name != "whole process")
    timings["fixed cost"] = timings["whole process"] - sum(
        timings.get(name, 0.0) for name in STEP_PHASES)
    return timings


def child_env(threads: int) -> dict[str, str]:
    """The environment of a measured process: one torch thread (or ``threads``), quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               LORAFLOW_QUIET="1", LORAFLOW_DEVICE=env.get("LORAFLOW_DEVICE", "cpu"))
    return env


def measure_fixed_cost(*, repeats: int = 3, steps: int = 1, threads: int = 1,
                       task: dict[str, Any] | None = None,
                       variants: tuple[str, ...] = ("cache", "no-cache"),
                       workdir: str | Path | None = None) -> dict[str, Any]:
    """Median phase seconds of cold ``loraflow segment`` processes, per variant.

    ``steps`` training steps per process (the phase ``training steps`` is reported but
    left out of ``fixed cost``). The first process of the cache variant builds the
    cache; it is discarded (a warm-up, as is the first process of every variant: it
    also fills the OS file cache), so every timed process finds what a later segment
    finds.
    """
    with tempfile.TemporaryDirectory(prefix="loraflow-fixed-cost-") as scratch:
        root = Path(workdir or scratch)
        task_file = root / "task.json"
        task_file.write_text(json.dumps(task or PEER_TASK))
        env = child_env(threads)
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for repeat in range(repeats + 1):  # the first round warms up
            for variant in variants:
                out = root / f"out-{variant}-{repeat}"
                cache = str(root / "cache") if variant == "cache" else None
                timings = time_process(segment_command(str(task_file), str(out),
                                                       cache_dir=cache, steps=steps), env, root)
                if repeat:
                    runs[variant].append(timings)
    return {"repeats": repeats, "steps": steps, "threads": threads,
            "variants": {v: medians(rows) for v, rows in runs.items()}}


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per phase, the median over the processes (a phase a process skipped counts 0)."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row if n not in names]
    return {n: statistics.median(row.get(n, 0.0) for row in rows) for n in names}


def render_fixed_cost(result: dict[str, Any]) -> str:
    """A markdown table: one row per phase, one column per variant."""
    variants = list(result["variants"])
    names: list[str] = []
    for v in variants:
        names += [n for n in result["variants"][v] if n not in names]
    tail = [n for n in ("fixed cost", "whole process") if n in names]
    names = [n for n in names if n not in tail] + tail
    lines = [f"fixed cost of a cold `loraflow segment` process ({result['steps']} step(s), "
             f"{result['threads']} thread(s), median of {result['repeats']})", "",
             "| phase | " + " | ".join(variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for n in names:
        cells = [f"{result['variants'][v].get(n, 0.0):.3f} s" for v in variants]
        label = f"**{n}**" if n in tail else n
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m engine.bench.fixed_cost [repeats]
    outcome = measure_fixed_cost(repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    sys.stdout.write(render_fixed_cost(outcome))
