"""The GPU check: one command to run whenever a GPU machine is lent.

    python -m engine.bench.gpu_check            # on the GPU machine, < ~8 minutes
    python -m engine.bench.gpu_check --smoke    # anywhere, seconds: tiny models on the CPU

It prints one markdown block, dated and naming the device, ready for
docs/performance.md ("GPU" section), and with ``--json F`` writes the figures as JSON:

1. throughput: SD1.5 at 512 px and SDXL at 1024 px, built from the full-size
   random-weight configs (:mod:`engine.bench.models`), samples/s, MFU and peak memory at
   a few batch sizes, through the engine's own step (:func:`engine.bench.run_benchmark`),
   with the SD1.5 warm restart (reload the base, restore, first step) and the step's
   non-UNet overhead;
2. the cost of determinism: the SD1.5 step with ``deterministic`` false over true, and
   ``compile`` on (over off, deterministic);
3. bit-exactness on this device with ``deterministic`` true, through
   :func:`engine.train.segment.run_segment`: k segments give the bytes of one run, and
   two runs give the same bytes (tiny SD1 and tiny SDXL, bf16 on a GPU).

The kernel switches are set (:func:`engine.train.determinism.apply_kernel_mode`) before
anything touches CUDA, because cuBLAS reads its workspace setting once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.bench.models import base_from_pipeline, build_pipeline
from engine.bench.probes import release_memory
from engine.bench.run import run_benchmark
from engine.bench.settings import bench_task, make_settings
from engine.bench.training import time_configuration
from engine.model.loading import training_device, weight_dtype
from engine.train.compiled import uncompile
from engine.train.determinism import apply_kernel_mode

log = logging.getLogger(__name__)

#: (bench family, batch sizes) measured on a GPU; the smoke run takes tiny ones on a CPU.
THROUGHPUT = (("sd15", [1, 8, 16]), ("sdxl", [1, 4, 8]))
SMOKE_THROUGHPUT = (("tiny-sd1", [1, 2]), ("tiny-sdxl", [1]))
#: the tiny models the bit-exactness check trains through run_segment
EXACT_MODELS = ("loraflow/tiny-sd1", "loraflow/tiny-sdxl")


def throughput(smoke: bool, device: torch.device) -> list[dict[str, Any]]:
    """One bench report per family: rows of samples/s, MFU, peak memory, restart."""
    out = []
    for family, batch_sizes in (SMOKE_THROUGHPUT if smoke else THROUGHPUT):
        settings = make_settings(
            family=family, batch_sizes=batch_sizes, device=str(device), smoke=smoke,
            repeats=1, steps=2 if smoke else 10, warmup=1 if smoke else 3, levers=[],
            live=False, restart=family in ("sd15", "tiny-sd1"),
        )
        log.info("throughput: %s at %d px, batches %s", family, settings.resolution,
                 batch_sizes)
        out.append(run_benchmark(settings).to_dict())
        release_memory(device)
    return out


def determinism_cost(smoke: bool, device: torch.device) -> dict[str, Any]:
    """Step time of SD1.5 (tiny SD1 in a smoke run) deterministic, fastest, and compiled."""
    family, batch = ("tiny-sd1", 2) if smoke else ("sd15", 8)
    settings = make_settings(family=family, batch_sizes=[batch], device=str(device),
                             smoke=smoke, repeats=1, steps=2 if smoke else 10,
                             warmup=1 if smoke else 3, levers=[], live=False, restart=False)
    pipe = build_pipeline(settings.model)
    base = base_from_pipeline(pipe, device, weight_dtype(settings.precision, device),
                              f"memory:{settings.model}")
    from engine.bench.data import SyntheticDataset

    dataset = SyntheticDataset(batch, settings.resolution)
    task = bench_task(base.location, settings, batch)
    rows: dict[str, Any] = {"model": family, "batch_size": batch}
    try:
        for name, deterministic in (("deterministic", True), ("fastest", False)):
            apply_kernel_mode(deterministic, device)
            rows[name] = time_configuration(base, task, dataset, None, settings)["step_seconds"]
        apply_kernel_mode(True, device)
        rows["fastest_over_deterministic"] = rows["fastest"] / rows["deterministic"]
        if not smoke:  # a compile takes minutes on a CPU; on a GPU about one
            compiled = bench_task(base.location, settings, batch, {"compile": True})
            try:
                rows["compiled"] = time_configuration(base, compiled, dataset, None,
                                                      settings)["step_seconds"]
                rows["compiled_over_eager"] = rows["compiled"] / rows["deterministic"]
            except Exception as exc:  # noqa: BLE001 - a failed compile is a finding
                rows["compiled"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            finally:
                uncompile(base.unet)
    finally:
        apply_kernel_mode(True, device)
    del pipe, base
    release_memory(device)
    return rows


def bit_exactness(smoke: bool, device: torch.device, workdir: Path) -> list[dict[str, Any]]:
    """k segments == one run, and two runs equal, through run_segment on this device."""
    from engine.task.validation import validate_document
    from engine.train.segment import SegmentOptions, run_segment

    rows = []
    for model in EXACT_MODELS[:1] if smoke else EXACT_MODELS:
        doc = {
            "model": {"name": model}, "dataset": {"name": "loraflow/demo-shapes"},
            "validation": {"num_images": 1, "num_inference_steps": 2},
            "train_args": {"learning_rate": 1e-3, "batch_size": 4, "scale_lr": False,
                           "resolution": 64, "num_train_steps": 6, "max_train_steps": 6,
                           "gradient_accumulation_steps": 2, "deterministic": True},
            "lora": {"rank": 4, "init_lora_weights": "gaussian"},
            "mixed_precision": "bf16" if device.type == "cuda" else "no",
            "seed": 7,
        }

        def lora_digest(name: str, segments: int, doc: dict = doc, model: str = model) -> str:
            checkpoint, steps = None, 6 // segments
            for i in range(segments):
                seg_doc = json.loads(json.dumps(doc))
                seg_doc["train_args"]["num_train_steps"] = steps
                opts = SegmentOptions(checkpoint=checkpoint, validate=False,
                                      cache_root=str(workdir / "cache"))
                result = run_segment(validate_document(seg_doc),
                                     str(workdir / f"{model.split('/')[-1]}-{name}-{i}"), opts)
                checkpoint = result.checkpoint
            data = (Path(checkpoint) / "pytorch_lora_weights.safetensors").read_bytes()
            return hashlib.sha256(data).hexdigest()

        one, again, three = lora_digest("one", 1), lora_digest("again", 1), lora_digest("k", 3)
        rows.append({"model": model, "one_run": one[:16], "two_runs_equal": one == again,
                     "three_segments_equal_one_run": one == three})
    return rows


def run_gpu_check(smoke: bool = False) -> dict[str, Any]:
    """Everything the check measures, as one JSON-able dict."""
    device = torch.device("cpu") if smoke else training_device()
    apply_kernel_mode(True, device)  # before any CUDA work (see the module docstring)
    if device.type != "cuda" and not smoke:
        raise SystemExit("no CUDA device here: run with --smoke, or on a GPU machine")
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "smoke": smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "cuda": torch.version.cuda,
    }
    with tempfile.TemporaryDirectory(prefix="loraflow-gpu-check-") as tmp:
        report["bit_exactness"] = bit_exactness(smoke, device, Path(tmp))
    report["determinism_cost"] = determinism_cost(smoke, device)
    report["throughput"] = throughput(smoke, device)
    report["seconds"] = time.perf_counter() - t0
    return report


def _gib(value: Any) -> str:
    return f"{value / 2**30:.1f} GiB" if isinstance(value, (int, float)) else "-"


def _num(value: Any, spec: str = ".1f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value or "-")


def render(report: dict[str, Any]) -> str:
    """The markdown block for docs/performance.md."""
    lines = [f"### GPU check, {report['date']}, {report['device']} (torch {report['torch']}, "
             f"CUDA {report['cuda']}){' - SMOKE RUN, not figures' if report['smoke'] else ''}",
             "", "`python -m engine.bench.gpu_check`, random weights, LoRA rank 4, from the "
             f"cache, deterministic kernels; {report['seconds']:.0f} s in all.", "",
             "| model | px | batch | samples/s | MFU | peak memory | non-UNet share |",
             "|---|---|---|---|---|---|---|"]
    restarts = []
    for bench in report["throughput"]:
        s = bench["settings"]
        shares = {o["batch_size"]: o["overhead_fraction"] for o in bench.get("overhead", [])}
        for row in bench["training"]:
            mfu = f"{row['mfu']:.1%}" if isinstance(row.get("mfu"), float) else "-"
            share = shares.get(row["batch_size"])
            lines.append(
                f"| {s['family']} | {s['resolution']} | {row['batch_size']} | "
                f"{_num(row.get('samples_per_second'))} | {mfu} | "
                f"{_gib(row.get('peak_memory_bytes'))} | "
                f"{f'{share:.1%}' if isinstance(share, float) else '-'} |")
        if bench.get("restart"):
            restarts.append(f"{s['family']}: warm restart {bench['restart']['seconds']:.1f} s")
    cost = report["determinism_cost"]
    lines += ["", f"Restart: {'; '.join(restarts) or 'not measured'}.",
              f"Determinism ({cost['model']}, batch {cost['batch_size']}, encoding every "
              "step): step "
              f"{_num(cost['deterministic'], '.3f')} s deterministic, "
              f"{_num(cost['fastest'], '.3f')} s fastest: fastest/deterministic = "
              f"{_num(cost['fastest_over_deterministic'], '.2f')}"
              + (f"; compiled {_num(cost.get('compiled'), '.3f')} s "
                 f"(compiled/eager {_num(cost.get('compiled_over_eager'), '.2f')})"
                 if "compiled" in cost else "") + ".", "",
              "| bit-exactness (deterministic, run_segment) | two runs equal | "
              "3 segments == 1 run |", "|---|---|---|"]
    for row in report["bit_exactness"]:
        lines.append(f"| {row['model']} | {row['two_runs_equal']} | "
                     f"{row['three_segments_equal_one_run']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds")
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = run_gpu_check(smoke=args.smoke)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    sys.stdout.write(render(report))
    exact = all(r["two_runs_equal"] and r["three_segments_equal_one_run"]
                for r in report["bit_exactness"])
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
