"""Memory and speed per optimizer: the engine's own trainer, one optimizer per process.

For each ``train_args.optimizer`` this trains a few steps of a task on tiny-sd1 (or the
given model) and reports samples/s of the timed steps, the bytes of the optimizer's
state tensors (exact: what it keeps per weight) and the process's peak RSS. Each
optimizer runs in a fresh process, so one's peak is not another's.

    python -m engine.bench.optimizers [--steps 6] [--model loraflow/tiny-sd1] [--out x.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from engine.train.optimizers import LIBRARIES

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"name": "adamw"},
    "adamw8bit": {"name": "adamw8bit"},
    "prodigy": {"name": "prodigy"},
    "adafactor": {"name": "adafactor"},
    "schedule_free_adamw": {"name": "schedule_free_adamw"},
}


def bench_task(model: str, choice: dict[str, Any], steps: int, ema: bool) -> Any:
    from engine.task.validation import validate_document

    train_args: dict[str, Any] = {
        "learning_rate": 1e-4, "batch_size": 4, "scale_lr": False, "resolution": 64,
        "num_train_steps": steps, "max_train_steps": steps, "optimizer": choice,
        "lr_scheduler": {"lr_scheduler": "constant", "lr_warmup_steps": 0},
    }
    if ema:
        train_args["ema"] = {"decay": 0.99}
    return validate_document({
        "model": {"name": model}, "dataset": {"name": "loraflow/demo-shapes"},
        "validation": {"num_images": 1}, "train_args": train_args,
        "lora": {"rank": 8}, "transforms": {"center_crop": True}, "seed": 0,
    })


def measure_one(model: str, name: str, steps: int, ema: bool) -> dict[str, Any]:
    """Train ``steps`` steps with optimizer ``name`` in this process; the first is warm-up."""
    import torch

    from engine.data.prepared import load_dataset_for_task
    from engine.model.loading import load_base_model
    from engine.train.optimizers import check_optimizer, state_tensor_bytes
    from engine.train.plan import TrainingPlan
    from engine.train.samples import SampleSource
    from engine.train.stream import batch_stream
    from engine.train.trainer import build_trainer, train_step

    task = bench_task(model, OPTIMIZERS[name], steps, ema)
    device = torch.device("cpu")
    check_optimizer(task, device)
    dataset = load_dataset_for_task(task, None)
    plan = TrainingPlan.for_task(task, dataset)
    trainer = build_trainer(task, load_base_model(task, device), plan)
    source = SampleSource(task, dataset, trainer.base, None)
    batches = batch_stream(source, plan, 0, steps, 0)
    train_step(trainer, batches)  # warm-up: lazily created state, first allocations
    samples, t0 = 0, time.perf_counter()
    for _ in range(steps - 1):
        samples += int(train_step(trainer, batches)["samples"])
    seconds = time.perf_counter() - t0
    batches.close()
    weights = sum(p.numel() * p.element_size() for p in trainer.params.values())
    ema_bytes = sum(t.numel() * t.element_size()
                    for t in (trainer.ema.shadow.values() if trainer.ema else []))
    return {
        "optimizer": name, "ema": ema, "steps_timed": steps - 1,
        "samples_per_second": round(samples / seconds, 2),
        "trainable_bytes": weights, "optimizer_state_bytes": state_tensor_bytes(trainer.optimizer),
        "ema_bytes": ema_bytes,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_all(model: str, steps: int, ema: bool) -> list[dict[str, Any]]:
    rows = []
    for name in OPTIMIZERS:
        command = [sys.executable, "-m", "engine.bench.optimizers", "--one", name,
                   "--model", model, "--steps", str(steps)] + (["--ema"] if ema else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            module = LIBRARIES.get(name, ("?",))[0]
            rows.append({"optimizer": name, "error": f"did not run (is {module} installed?): "
                         + (done.stderr.strip().splitlines() or ["no output"])[-1]})
            continue
        rows.append(json.loads(lines[-1]))
    return rows


def render_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| optimizer | samples/s | optimizer state | x weights | EMA | peak RSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['optimizer']} | {row['error']} | | | | |")
            continue
        ratio = row["optimizer_state_bytes"] / row["trainable_bytes"]
        lines.append(
            f"| {row['optimizer']} | {row['samples_per_second']:.2f} "
            f"| {row['optimizer_state_bytes'] / 1024:.0f} KiB | {ratio:.2f} "
            f"| {row['ema_bytes'] / 1024:.0f} KiB | {row['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="loraflow/tiny-sd1")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ema", action="store_true", help="also keep an EMA")
    parser.add_argument("--one", choices=sorted(OPTIMIZERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.model, args.one, args.steps, args.ema)))
        return
    rows = run_all(args.model, args.steps, args.ema)
    table = render_markdown(rows)
    print(json.dumps(rows, indent=2))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
